"""The sample index of a shard split, and the tar header walk that builds it and reads samples.

Sample index. Readers do not stream a shard from its start: real datasets arrive sorted by
class, and a stream that follows the files' order deals class-skewed slices. They read any
sample directly instead, with one `pread` of its byte range (`ShardFiles`), through a
per-shard index (`ShardIndex`): the byte offset where each sample's first tar header
starts, plus the end of the last sample, and each sample's class (`NNNNNN.idx.npy` next to
its shard, a numpy record array of ("offset", "label"), written atomically with the shard
and named in its manifest entry; read with `allow_pickle=False` only). For shards without
one (older or foreign splits) the index is built once per process by walking the tar
headers (`scan_shard`); `disttrain shards index SPLIT` writes the missing ones. Members are
grouped into samples as WebDataset does: the key is the member path up to the first dot of
its base name. `SplitIndex` puts the shards' indexes together, numbering every sample of a
split, and reports how the samples the shards hold differ from the manifest.

Why the tar walk is hand-written. `_walk_members` reads a header block and steps over the
member's data: 15-20 us a member, about 4x faster than `tarfile`. It sits on the
per-sample hot path: every sample a reader serves is parsed from its bytes by it
(`parse_sample`), as is every shard scanned for an index. What it leaves alone -- sparse
members, base-256 numbers -- it hands over to `tarfile` (`_members`), the slower fallback
that reads any tar.

The split itself (`ShardSplit`, its manifest, `DataError`) is `disttrain.data.shards`.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from disttrain.errors import DataError, MissingShardError


class Split(Protocol):
    """What the index needs of a shard split (`disttrain.data.shards.ShardSplit` is one): no import of
    it here, since `shards` builds on this module."""

    root: Path
    manifest: dict[str, Any]
    shard_names: list[str]
    shard_sizes: list[int]


# --------------------------------------------------------------------------- tar headers


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: tarfile reads no data
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset skips these members entirely
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext

Member = tuple[int, str, int, int]  # (offset of its first header, name, offset of its data, data size)
Read = Callable[[int, int], bytes]  # read(offset, size) -> at most size bytes


class _UnusualTar(Exception):
    """A tar feature the fast header walk leaves to `tarfile` (sparse files, base-256 numbers)."""


class _DamagedTar(Exception):
    """A header that fails its checksum: the bytes from here on are not a tar stream."""



def tell(kind: str, message: str) -> None:
    """One line on stderr, from the first process of a launch only: every rank reads the same
    split, so the same line from each would say nothing more."""
    if os.environ.get("RANK", "0") == "0":
        print(f"disttrain: {kind}: {message}", file=sys.stderr, flush=True)


def _some(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _number(field_bytes: bytes) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):
        raise _UnusualTar("base-256 number")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    return stored == unsigned or stored == 256 + sum(struct.unpack_from("148b8x356b", block))


def _pax_records(data: bytes) -> dict[str, str]:
    """POSIX extended header records: `LEN key=value\\n` ..."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise _DamagedTar("bad pax record")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _walk_members(read: Read, end: int, whole_file: bool) -> Iterator[Member]:
    """The regular files of a tar stream of `end` bytes, from its first header.

    Ends at the end-of-archive block, or at `end` for a part of a file (`whole_file=False`);
    raises `_DamagedTar` where the stream is cut short (inside a header or a member's data,
    or a whole file without its end-of-archive block) or a header fails its checksum, and
    `_UnusualTar` for what it leaves to `tarfile`. Handles POSIX extended (pax)
    and GNU long-name headers -- Python's tarfile writes a pax header before every member
    whose mtime is a float, as WebDataset's TarWriter sets it.
    """
    pos, first, long_name, pax = 0, None, None, {}
    while pos < end:
        block = read(pos, _BLOCK)
        if len(block) < _BLOCK:
            raise _DamagedTar(f"it is cut short inside the header at byte {pos}")
        if block == _ZERO_BLOCK:
            return
        if not _checksum_ok(block):
            raise _DamagedTar(f"the header at byte {pos} fails its checksum")
        kind, size, data = block[156:157], _number(block[124:136]), pos + _BLOCK
        first = pos if first is None else first
        if data + (0 if kind in _NO_DATA else size) > end:
            raise _DamagedTar(f"it is cut short inside the member at byte {pos}")
        if kind in (b"x", b"g", b"L", b"K"):  # extended headers: they describe the next member
            payload = read(data, size)
            if kind == b"x":
                pax = _pax_records(payload)
            elif kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind == b"g":
                first = None  # a global header belongs to no member
            pos = data + _padded(size)
            continue
        if kind == b"S":
            raise _UnusualTar("a sparse member")
        name = pax.get("path") or long_name or _header_name(block)
        size = int(pax["size"]) if "size" in pax else size
        stored = 0 if kind in _NO_DATA else size
        if data + stored > end:
            raise _DamagedTar(f"it is cut short inside the member at byte {pos}")
        if kind in _REGULAR:
            yield first, name, data, size
        pos, first, long_name, pax = data + _padded(stored), None, None, {}
    if whole_file:
        raise _DamagedTar(f"it ends at byte {end} without tar's end-of-archive block (cut short?)")


def _header_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field for long paths (GNU tar has none)
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _tarfile_members(fileobj: Any, end: int) -> Iterator[Member]:
    """What `_walk_members` yields, by `tarfile` (slower; any format it reads)."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError:
                return  # damaged or cut short from here on
            if member is None:
                return
            if member.isreg():
                if member.offset_data + member.size > end:
                    return
                yield member.offset, member.name, member.offset_data, member.size
            tar.members = []  # keep no list of what was read


def _members(read: Read, end: int, open_file: Callable[[], Any], whole_file: bool) -> Iterator[Member]:
    """`_walk_members`, handing over to `tarfile` from the first member it leaves to it."""
    last = -1
    try:
        for member in _walk_members(read, end, whole_file):
            last = member[0]
            yield member
    except _UnusualTar:
        with open_file() as fileobj:
            yield from (m for m in _tarfile_members(fileobj, end) if m[0] > last)


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as WebDataset groups them; None for members it skips."""
    if _SKIP_META.match(name):
        return None
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _label(data: bytes) -> int:
    try:
        return int(data)
    except ValueError:
        return -1


# --------------------------------------------------------------------------- the sample index


INDEX_SUFFIX = ".idx.npy"
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("label", "<i8")])


def index_name(shard: str) -> str:
    """The sample index of shard `shard` (a path relative to the split): `000001.tar` -> `000001.idx.npy`."""
    return (shard[:-4] if shard.endswith(".tar") else shard) + INDEX_SUFFIX


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one shard is: sample i is bytes [offsets[i], offsets[i + 1])."""

    offsets: np.ndarray  # int64, num_samples + 1
    labels: np.ndarray  # int64, num_samples; -1: unlabelled, or a `cls` member that is not a number
    damage: str = ""  # why the shard's headers end before the end of its file ("" when they do not)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def same_as(self, other: ShardIndex) -> bool:
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.labels, other.labels)

    def to_bytes(self) -> bytes:
        table = np.zeros(self.num_samples + 1, INDEX_DTYPE)
        table["offset"], table["label"][:-1], table["label"][-1] = self.offsets, self.labels, -1
        buf = io.BytesIO()
        np.save(buf, table, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path, file_size: int) -> ShardIndex | None:
        """The sidecar at `path` when it is well formed and fits a shard of `file_size` bytes."""
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if table.dtype != INDEX_DTYPE or table.ndim != 1 or len(table) < 1:
            return None
        offsets = table["offset"].astype(np.int64)
        if offsets[0] < 0 or offsets[-1] > file_size or np.any(np.diff(offsets) <= 0):
            return None
        return cls(offsets, table["label"][:-1].astype(np.int64))


def write_index(path: Path, shard_index: ShardIndex) -> None:
    """A shard's sample index, atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(shard_index.to_bytes())
    os.replace(tmp, path)


def scan_shard(path: Path) -> ShardIndex:
    """A shard's index from its tar headers (reads headers and `cls` members, not the images)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        window = _Window(f.fileno())
        starts: list[int] = []
        labels: list[int] = []
        end, key, damage = 0, None, ""
        try:
            for first, name, data, nbytes in _members(window.read, size, lambda: open(path, "rb"), True):
                parts = sample_key(name)
                if parts is None:
                    continue
                if parts[0] != key:
                    key = parts[0]
                    starts.append(first)
                    labels.append(-1)
                if parts[1] == "cls":
                    labels[-1] = _label(window.read(data, min(nbytes, 64)))
                end = data + _padded(nbytes)
        except (_DamagedTar, ValueError) as err:
            damage = f"{err}; the samples after it cannot be read"
    return ShardIndex(np.array(starts + [end] if starts else [0], np.int64), np.array(labels, np.int64), damage)


class _Window:
    """Reads through a small window: the headers and data of a sample's small members (`cls`,
    `json`, their pax headers) lie next to each other; larger windows only copy image bytes."""

    def __init__(self, fd: int, size: int = 8192):
        self.fd, self.size, self.start, self.buf = fd, size, 0, b""

    def read(self, offset: int, size: int) -> bytes:
        if not (self.start <= offset and offset + size <= self.start + len(self.buf)):
            self.start, self.buf = offset, os.pread(self.fd, max(size, self.size), offset)
        return self.buf[offset - self.start:offset - self.start + size]


def _data_error(message: str) -> Exception:
    return DataError(message)


def parse_sample(chunk: bytes, url: str = "") -> dict[str, Any]:
    """The members of one sample from its bytes (its tar headers and data): {"__key__", ext: bytes, ...}."""
    sample: dict[str, Any] = {"__url__": url}
    try:
        for _, name, data, size in _members(lambda o, n: chunk[o:o + n], len(chunk), lambda: io.BytesIO(chunk), False):
            parts = sample_key(name)
            if parts is None:
                continue
            key, ext = parts
            if sample.setdefault("__key__", key) != key:
                raise _data_error(f"the bytes of sample {sample['__key__']} in {url} also hold {key} (the shard "
                                f"changed after its index was made)")
            sample[ext] = chunk[data:data + size]
    except (_DamagedTar, tarfile.TarError) as err:
        raise _data_error(f"a sample in {url} is not a tar record ({err})") from None
    if "__key__" not in sample:
        raise _data_error(f"a sample in {url} holds no member")
    return sample


@dataclass(frozen=True)
class SplitIndex:
    """Every sample of a split, by position 0..N-1 (shard by shard, in file order): which shard,
    its byte range and class. N counts what the shards hold, whatever the manifest says."""

    shards: np.ndarray  # int32 [N]
    starts: np.ndarray  # int64 [N]
    ends: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N]
    counts: list[int]  # samples per shard
    report: dict[str, int]  # listed_samples, actual_samples, missing_samples, unlisted_samples

    @property
    def num_samples(self) -> int:
        return len(self.starts)


def build_index(split: Split) -> SplitIndex:
    """Load each shard's sidecar index, or scan its headers; compare the counts with the manifest."""

    started = time.perf_counter()
    parts, unindexed, damaged = [], [], []
    for entry in split.manifest["shards"]:
        path = split.root / entry["name"]
        size = path.stat().st_size
        shard_index = None
        if entry.get("size", size) == size:  # a shard that changed size is read again, never trusted
            # where the manifest says, else next to the shard (a writer may have moved shards into folders)
            sidecar = next((split.root / c for c in (entry.get("index"), index_name(entry["name"]))
                            if c and (split.root / c).is_file()), None)
            shard_index = ShardIndex.load(sidecar, size) if sidecar is not None else None
            if shard_index is None:
                unindexed.append(entry["name"])
        if shard_index is None:
            shard_index = scan_shard(path)
            if shard_index.damage:
                damaged.append(f"{entry['name']}: {shard_index.damage}")
        parts.append(shard_index)
    if unindexed:
        tell("note", f"{split.root}: read the tar headers of {len(unindexed)} of {len(parts)} shards, which have no "
                     f"valid sample index ({time.perf_counter() - started:.1f} s); `disttrain shards index "
                     f"{split.root}` writes them once")
    if damaged:
        tell("warning", f"{split.root}: damaged shards: {_some(damaged)}")
    counts = [p.num_samples for p in parts]
    index = SplitIndex(
        shards=np.repeat(np.arange(len(parts), dtype=np.int32), counts),
        starts=np.concatenate([p.offsets[:-1] for p in parts]).astype(np.int64),
        ends=np.concatenate([p.offsets[1:] for p in parts]).astype(np.int64),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        counts=counts, report=_compare_counts(split, counts))
    return index


def _compare_counts(split: Split, counts: list[int]) -> dict[str, int]:

    listed = split.shard_sizes
    missing = [(name, n, c) for name, n, c in zip(split.shard_names, listed, counts) if c < n]
    unlisted = [(name, n, c) for name, n, c in zip(split.shard_names, listed, counts) if c > n]
    report = {"listed_samples": sum(listed), "actual_samples": sum(counts),
              "missing_samples": sum(n - c for _, n, c in missing),
              "unlisted_samples": sum(c - n for _, n, c in unlisted)}
    if missing or unlisted:
        shards = [f"{name} lists {n}, holds {c}" for name, n, c in missing + unlisted]
        tell("warning", f"{split.root}: the shards hold {report['actual_samples']} samples, the manifest lists "
                         f"{report['listed_samples']}: {report['missing_samples']} listed samples are missing and "
                         f"{report['unlisted_samples']} unlisted ones are read too ({_some(shards)}); reading what "
                         f"the shards hold -- check with `disttrain shards verify {split.root}`, rebuild with "
                         f"`disttrain shards build`")
    return report


class ShardFiles:
    """Open shard files of one process, a small LRU of descriptors: a sample is one `pread`."""

    def __init__(self, root: Path, names: list[str], capacity: int = 32):
        self.root, self.names, self.capacity = root, names, capacity
        self._open: OrderedDict[int, int] = OrderedDict()

    def read(self, shard: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of shard `shard`; OSError when they cannot all be read."""
        fd = self._open.pop(shard, None)
        if fd is None:
            path = self.root / self.names[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:

                raise MissingShardError(f"shard {path} is missing (listed in its split's manifest)") from None
            if len(self._open) >= self.capacity:
                os.close(self._open.popitem(last=False)[1])
        self._open[shard] = fd
        data = os.pread(fd, end - start, start)
        if len(data) < end - start:
            raise OSError(f"{self.names[shard]} ends at byte {start + len(data)}, inside the sample at "
                          f"[{start}, {end}) (the file was cut short)")
        return data

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

