"""WebDataset shard splits: the on-disk format, an atomic writer, the manifest checks, evaluation reading.

A split is a folder of `NNNNNN.tar` shards plus `manifest.json` (per shard: samples, byte
size, sha256, class counts and its sample index; class names and counts; the manifest is
written last, so a folder without one is not a split). Samples are `__key__`, an encoded
image (`jpg`/`png`/...), `cls` (class index, -1 for unlabelled) and `json` (metadata:
source path, class name and id).

Readers find each sample through a per-shard sample index, written next to each shard
(`NNNNNN.idx.npy`) or built from its tar headers: see `disttrain.data.tarindex`.

The manifest is checked, not trusted: a malformed one is a `DataError` naming the file; a
shard whose byte size differs from the manifest is re-indexed from its headers; the
readers serve the samples the shards actually hold and report how that differs from the
manifest (`tarindex.SplitIndex.report`).

Training streams are in `disttrain.data.stream`; converting datasets into splits is
`disttrain.data.sharding` (`disttrain shards`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from disttrain import files
from disttrain.data.tarindex import (_some, tell, ShardFiles, SplitIndex, build_index, index_name, parse_sample, scan_shard,
                                     write_index)
from disttrain.errors import DataError, MissingShardError  # defined with ConfigError; imported from here by the data layer

MANIFEST = "manifest.json"
FORMAT = "disttrain-shards/1"


# --------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def make_sample(key: str, image_bytes: bytes, ext: str, cls: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {"__key__": key, ext: image_bytes, "cls": str(cls).encode(), "json": json.dumps(meta).encode()}


def write_shard(out_dir: Path, index: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one shard and then its sample index, each atomically (temp file, then rename);
    returns its manifest entry."""
    name = shard_name(index)
    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    with tmp.open("wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for sample in samples:
            writer.write(sample)
        writer.close()
    os.replace(tmp, final)
    # The index is read back from the written bytes, so it is exactly what a scan would find.
    shard_index = scan_shard(final)
    if shard_index.num_samples != len(samples):
        raise DataError(f"{final}: wrote {len(samples)} samples but the shard holds {shard_index.num_samples} "
                        f"(consecutive samples with the same key merge into one: make keys unique)")
    write_index(out_dir / index_name(name), shard_index)
    return {"name": name, "num_samples": len(samples), "size": final.stat().st_size, "sha256": sha256_file(final),
            "index": index_name(name)}


def write_manifest(out_dir: Path, classes: list[str], shards: list[dict[str, Any]], class_counts: list[int],
                   **extra: Any) -> dict[str, Any]:
    manifest = {"format": FORMAT, "num_samples": sum(s["num_samples"] for s in shards), "classes": classes,
                "class_counts": class_counts, "shards": shards, **extra}
    files.write_json(out_dir / MANIFEST, manifest)
    return manifest


class ShardSplitWriter:
    """Write samples in order into shards of `samples_per_shard`; the manifest on `close`."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int, classes: list[str]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.classes = classes
        self.shards: list[dict[str, Any]] = []
        self.class_counts = [0] * len(classes)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_counts = [0] * len(classes)

    def write(self, key: str, image_bytes: bytes, ext: str, cls: int, meta: dict[str, Any]) -> None:
        self._buffer.append(make_sample(key, image_bytes, ext, cls, meta))
        if cls >= 0:
            self.class_counts[cls] += 1
            self._buffer_counts[cls] += 1
        if len(self._buffer) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            entry = write_shard(self.out_dir, len(self.shards), self._buffer)
            self.shards.append({**entry, "class_counts": self._buffer_counts})
            self._buffer, self._buffer_counts = [], [0] * len(self.classes)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self._flush()
        return write_manifest(self.out_dir, self.classes, self.shards, self.class_counts, **(extra or {}))


# --------------------------------------------------------------------------- counting served and damaged samples


COUNTERS = ("served_samples", "corrupt_samples", "unreadable_samples")
_MAX_WARNINGS = 10  # per process; the counters keep counting


class DataCounters:
    """Samples served, and damaged ones skipped: `corrupt` (present, but the image or label does
    not decode) and `unreadable` (the bytes could not be read). Shared with DataLoader worker
    processes forked after it was made; warns on stderr about the first few damaged samples of
    each process, then counts silently."""

    def __init__(self, shared: bool = True) -> None:
        self._values: Any = (multiprocessing.get_context().Array("q", len(COUNTERS)) if shared
                             else [0] * len(COUNTERS))
        self._warned = 0

    def _add(self, slot: int) -> None:
        if hasattr(self._values, "get_lock"):
            with self._values.get_lock():
                self._values[slot] += 1
        else:
            self._values[slot] += 1

    def served(self) -> None:
        self._add(0)

    def damaged(self, kind: str, message: str) -> None:
        """kind: "corrupt" or "unreadable"."""
        self._add(COUNTERS.index(f"{kind}_samples"))
        self.warn(f"skipped {message}")

    def warn(self, message: str) -> None:
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            print(f"disttrain: warning: {message}", file=sys.stderr, flush=True)

    def snapshot(self) -> dict[str, int]:
        return {kind: int(self._values[i]) for i, kind in enumerate(COUNTERS)}

    def reset(self) -> None:
        for i in range(len(COUNTERS)):
            self._values[i] = 0


def read_sample(files_: ShardFiles, index: SplitIndex, position: int, counters: DataCounters
                ) -> dict[str, Any] | None:
    """The raw sample at `position`, or None (counted as unreadable) when its bytes cannot be read."""
    shard = int(index.shards[position])
    url = str(files_.root / files_.names[shard])
    try:
        return parse_sample(files_.read(shard, int(index.starts[position]), int(index.ends[position])), url)
    except MissingShardError:
        raise  # not one damaged sample: the split is not what it was when the run started
    except (DataError, OSError) as err:
        counters.damaged("unreadable", f"sample {position} of {files_.root}: {err}")
    return None


def decode_sample(sample: dict[str, Any], counters: DataCounters, num_classes: int = 0
                  ) -> tuple[Image.Image, int] | None:
    """(RGB image, label) of a raw sample, or None (counted as corrupt) when either does not decode
    or, with `num_classes`, the label is not -1 or a class index (it would fail the loss later)."""
    try:
        label = int(sample["cls"])
        if num_classes and not -1 <= label < num_classes:
            raise ValueError(f"class {label} is not one of the split's {num_classes}")
        return decode_image(sample), label
    except (OSError, ValueError, SyntaxError, KeyError, Image.DecompressionBombError) as err:
        counters.damaged("corrupt", f"{sample.get('__key__')} in {sample.get('__url__')}: {err}")
        return None


# --------------------------------------------------------------------------- reading


def _manifest_problem(manifest: Any) -> str:
    """What is wrong with a manifest's structure ("" when nothing is)."""
    def number(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    for key in ("shards", "classes"):
        if not isinstance(manifest.get(key), list):
            return f"`{key}` is {'missing' if key not in manifest else 'not a list'}"
    if not all(isinstance(c, str) for c in manifest["classes"]):
        return "`classes` holds something other than names"
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            return f"shard entry {i} has no `name`"
        if not number(entry.get("num_samples")):
            return f"shard entry {i} ({entry['name']}) has no `num_samples` count"
        if "size" in entry and not number(entry["size"]):
            return f"shard entry {i} ({entry['name']}) has a `size` that is not a byte count"
        for key in ("sha256", "index"):
            if key in entry and not isinstance(entry[key], str):
                return f"shard entry {i} ({entry['name']}) has a `{key}` that is not a string"
    return ""


@dataclass(frozen=True)
class ShardSplit:
    """A split on disk, as its manifest describes it (`index`: as its shards hold it)."""

    root: Path
    classes: list[str]
    shard_names: list[str]
    shard_sizes: list[int]
    manifest: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike, verify_checksums: bool = False) -> ShardSplit:
        """Read and check the manifest: its structure, that every shard is there and has the byte
        size it lists (a mismatch is reported; readers re-index that shard); with
        `verify_checksums` the sha256 of every shard too (reads all of them)."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{root} is not a shard split: {manifest_path} is missing (a split is a folder of "
                            f"NNNNNN.tar shards with a manifest.json; `disttrain demo-data` writes an example)")
        fix = (f"rebuild the split with `disttrain shards build`, or write a valid one (see what else is wrong "
               f"with `disttrain shards verify {root}`)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{manifest_path} is not valid JSON ({err}): {fix}") from None
        problem = _manifest_problem(manifest)
        if problem:
            raise DataError(f"{manifest_path} is malformed: {problem}; {fix}")
        names = [s["name"] for s in manifest["shards"]]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise DataError(f"{root}: shards listed in {MANIFEST} are missing: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if not names:
            raise DataError(f"{root}: the manifest lists no shards")
        split = cls(root, list(manifest["classes"]), names, [int(s["num_samples"]) for s in manifest["shards"]],
                    manifest)
        split._check_sizes()
        if verify_checksums:
            split._check_checksums()
        return split

    def _check_sizes(self) -> None:
        changed = [f"{e['name']}: {(self.root / e['name']).stat().st_size} bytes, listed {e['size']}"
                   for e in self.manifest["shards"] if "size" in e
                   and (self.root / e["name"]).stat().st_size != e["size"]]
        if changed:
            tell("warning", f"{self.root}: {len(changed)} shards differ in size from the manifest, so they "
                             f"changed or were cut short since it was written ({_some(changed)}); their headers "
                             f"are read again and what is missing is skipped -- check with `disttrain shards "
                             f"verify {self.root}`")

    def _check_checksums(self) -> None:
        entries = self.manifest["shards"]
        unchecked = [e["name"] for e in entries if not e.get("sha256")]
        wrong = [e["name"] for e in entries if e.get("sha256") and sha256_file(self.root / e["name"]) != e["sha256"]]
        if wrong:
            raise DataError(f"{self.root}: the sha256 of {len(wrong)} shards differs from the manifest "
                            f"({', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}): they changed or are damaged "
                            f"since the split was written; restore them, or rebuild with `disttrain shards build` "
                            f"(`disttrain shards verify {self.root}` lists what is damaged)")
        if unchecked:
            tell("note", f"{self.root}: the manifest records no sha256 for {len(unchecked)} shards (not checked)")

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def index(self) -> SplitIndex:
        """Where every sample is (built once per process, at first use; see `build_index`)."""
        return build_index(self)

    def shard_class_counts(self) -> list[list[int]] | None:
        """Per-shard class counts when the manifest records them."""
        entries = self.manifest["shards"]
        if not all(isinstance(e.get("class_counts"), list) for e in entries):
            return None
        return [list(e["class_counts"]) for e in entries]


def seed_of(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as img:
                return img.convert("RGB")
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")


def ignore_stop_signals(_worker_id: int) -> None:
    # Launchers signal the whole process group on pre-emption; the trainer process handles it
    # (saves, then shuts its workers down), so a worker must not die of it mid-batch.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------- evaluation reading


def worker_share(stream: IterableDataset) -> tuple[int, int]:
    """(this DataLoader worker, number of workers) to split `stream` by; (0, 1) outside a loader
    or when the stream is read whole inside another loader's worker (`stream.whole = True`)."""
    info = get_worker_info()
    if info is None or getattr(stream, "whole", False):
        return 0, 1
    return info.id, info.num_workers


def my_indices(stream: IterableDataset, count: int, rank: int, world_size: int) -> Iterator[int]:
    """This rank's sample indices (i % world_size == rank), split further among DataLoader workers."""
    worker, workers = worker_share(stream)
    for position, index in enumerate(range(rank, count, world_size)):
        if position % workers == worker:
            yield index


class ShardEvalStream(IterableDataset):
    """Every readable sample of a split exactly once over all ranks, in order of position: sample i
    (as the shards hold them, see `SplitIndex`) goes to rank i % world_size. A sample that cannot
    be read or decoded is skipped and counted in `counters`; its index is simply absent."""

    def __init__(self, split: ShardSplit, transform: Callable[[Image.Image], torch.Tensor], rank: int,
                 world_size: int, counters: DataCounters | None = None):
        self.split, self.transform, self.rank, self.world_size = split, transform, rank, world_size
        self.index = split.index
        self.counters = counters if counters is not None else DataCounters(shared=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        shard_files = ShardFiles(self.split.root, self.split.shard_names)
        try:
            for position in my_indices(self, self.index.num_samples, self.rank, self.world_size):
                sample = read_sample(shard_files, self.index, position, self.counters)
                decoded = decode_sample(sample, self.counters, self.split.num_classes) if sample else None
                if decoded is None:
                    continue
                self.counters.served()
                yield self.transform(decoded[0]), decoded[1], position
        finally:
            shard_files.close()

    @classmethod
    def for_split(cls, split: ShardSplit) -> Callable[..., ShardEvalStream]:
        return lambda transform, rank, world_size, counters=None: cls(split, transform, rank, world_size, counters)


def iter_samples(split: ShardSplit) -> Iterable[dict[str, Any]]:
    """Every raw sample of a split in position order (for tools; training reads through the streams)."""
    shard_files = ShardFiles(split.root, split.shard_names)
    counters = DataCounters(shared=False)
    try:
        for position in range(split.index.num_samples):
            sample = read_sample(shard_files, split.index, position, counters)
            if sample is not None:
                yield sample
    finally:
        shard_files.close()
