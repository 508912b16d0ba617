"""WebDataset shards: an atomic writer with a manifest, and a deterministic, resumable reader.

A split is a folder of `NNNNNN.tar` shards plus `manifest.json` (samples per shard,
sha256, class names and counts). Samples are `__key__`, an encoded image (`jpg`/`png`),
`cls` (class index, -1 for unlabelled) and `json` (metadata).

Reading: each epoch the shard list is permuted with (seed, epoch) and dealt to
`world_size x num_workers` slots; each slot shuffles its samples through a seeded buffer.
A rank interleaves its workers' batches round-robin (what `DataLoader` does), so the
rank's batch sequence is a pure function of (seed, epoch, rank). Resuming at micro-batch
K replays nothing: each worker skips, still undecoded, the samples it had already served,
and the workers are rotated so the round-robin continues where it stopped. Augmentation
randomness is seeded per sample, so skipped samples leave no trace in later ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain import files

MANIFEST = "manifest.json"


class DataError(ValueError):
    """Missing or malformed data, reported before training starts."""


# --------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardSplitWriter:
    """Write samples into fixed-size shards; each shard appears atomically (temp + rename)."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int, classes: list[str]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.classes = classes
        self.shards: list[dict[str, Any]] = []
        self.class_counts = [0] * len(classes)
        self._buffer: list[dict[str, Any]] = []

    def write(self, key: str, image_bytes: bytes, ext: str, cls: int, meta: dict[str, Any]) -> None:
        self._buffer.append({"__key__": key, ext: image_bytes, "cls": str(cls).encode(),
                             "json": json.dumps(meta).encode()})
        if cls >= 0:
            self.class_counts[cls] += 1
        if len(self._buffer) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"{len(self.shards):06d}.tar"
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.tmp"
        with tmp.open("wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for sample in self._buffer:
                writer.write(sample)
            writer.close()
        os.replace(tmp, final)
        self.shards.append({"name": name, "num_samples": len(self._buffer), "sha256": _sha256(final)})
        self._buffer = []

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self._flush()
        manifest = {"format": "disttrain-shards/1", "num_samples": sum(s["num_samples"] for s in self.shards),
                    "classes": self.classes, "class_counts": self.class_counts, "shards": self.shards,
                    **(extra or {})}
        files.write_json(self.out_dir / MANIFEST, manifest)
        return manifest


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardSplit:
    """A split on disk, as its manifest describes it."""

    root: Path
    classes: list[str]
    shard_names: list[str]
    shard_sizes: list[int]

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardSplit":
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{root} is not a shard split: {manifest_path} is missing (a split is a folder of "
                            f"NNNNNN.tar shards with a manifest.json; `disttrain demo-data` writes an example)")
        manifest = json.loads(manifest_path.read_text())
        names = [s["name"] for s in manifest["shards"]]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise DataError(f"{root}: shards listed in {MANIFEST} are missing: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if not names:
            raise DataError(f"{root}: the manifest lists no shards")
        return cls(root, list(manifest["classes"]), names, [int(s["num_samples"]) for s in manifest["shards"]])

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _seed_of(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as img:
                return img.convert("RGB")
    raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")


class _SlotStream(IterableDataset):
    """The samples of one epoch on one rank; each DataLoader worker serves one slot."""

    def __init__(self, reader: "ShardReader", epoch: int, skip_batches: int):
        self.reader = reader
        self.epoch = epoch
        self.plan = reader.epoch_plan(epoch, skip_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot, skip_samples, num_samples = self.plan[worker]
        r = self.reader
        urls = [str(r.split.root / name) for name in r.slot_shards(self.epoch, slot)]
        samples = wds.tarfile_to_samples()(({"url": u} for u in urls))
        rng = random.Random(_seed_of(r.seed, self.epoch, r.rank, slot))
        buffer: list[dict[str, Any]] = []
        served = 0
        for sample in _shuffled(samples, buffer, r.shuffle_buffer, rng):
            if served >= num_samples:
                return
            served += 1
            if served <= skip_samples:
                continue  # already trained on before the checkpoint; skipped undecoded
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        image = decode_image(sample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(self.reader.seed, self.epoch, sample["__key__"]))
            tensor = self.reader.transform(image)
        return tensor, int(sample["cls"])


def _shuffled(samples: Iterator[dict], buffer: list, size: int, rng: random.Random) -> Iterator[dict]:
    for sample in samples:
        if size <= 1:
            yield sample
            continue
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


def ignore_stop_signals(_worker_id: int) -> None:
    # Launchers signal the whole process group on pre-emption; the trainer process handles it
    # (saves, then shuts its workers down), so a worker must not die of it mid-batch.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ShardReader:
    """Deterministic, resumable per-rank loader over a `ShardSplit`."""

    def __init__(self, split: ShardSplit, transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 workers_key: str = "data.num_workers"):
        self.split = split
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        num_slots = world_size * self.slots_per_rank
        if len(split.shard_names) < num_slots:
            raise DataError(
                f"{split.root} has {len(split.shard_names)} shards, fewer than world size {world_size} x "
                f"{workers_key}={num_workers} = {num_slots} readers; lower {workers_key} or write the split "
                f"into at least {num_slots} shards")

    # The slot a shard lands in changes every epoch, but a slot always gets the same *number* of
    # shards; counting each slot's worst case (its k smallest shards) gives an epoch length
    # that holds for every epoch and every rank.
    def _slot_of_position(self) -> list[int]:
        num_slots = self.world_size * self.slots_per_rank
        return [pos % num_slots for pos in range(len(self.split.shard_names))]

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.split.shard_names)))
        random.Random(_seed_of(self.seed, "shards", epoch)).shuffle(order)
        return order

    def slot_shards(self, epoch: int, slot: int) -> list[str]:
        """Shard names for `slot` (0..slots_per_rank-1) of this rank in `epoch`."""
        global_slot = self.rank * self.slots_per_rank + slot
        order = self._shard_order(epoch)
        return [self.split.shard_names[order[pos]] for pos, s in enumerate(self._slot_of_position())
                if s == global_slot]

    def _slot_batches(self, epoch: int) -> list[int]:
        """Whole batches each of this rank's slots yields in `epoch`."""
        return [sum(self.split.shard_sizes[self.split.shard_names.index(n)] for n in self.slot_shards(epoch, s))
                // self.batch_size for s in range(self.slots_per_rank)]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch, equal on every rank and in every epoch."""
        sizes = sorted(self.split.shard_sizes)
        per_slot_count = [0] * (self.world_size * self.slots_per_rank)
        for s in self._slot_of_position():
            per_slot_count[s] += 1
        worst = [sum(sizes[:k]) // self.batch_size for k in per_slot_count]
        per_rank = [sum(worst[r * self.slots_per_rank:(r + 1) * self.slots_per_rank]) for r in range(self.world_size)]
        return min(per_rank)

    def epoch_plan(self, epoch: int, skip_batches: int) -> list[tuple[int, int, int]]:
        """(slot, samples to skip, samples to serve) for DataLoader worker 0..W-1.

        Replays the round-robin over slots for `skip_batches` batches, then rotates the
        slots so that worker 0 holds the slot whose batch comes next.
        """
        remaining = self._slot_batches(epoch)
        consumed = [0] * self.slots_per_rank
        nxt = 0
        for _ in range(skip_batches):
            while remaining[nxt] == 0:
                nxt = (nxt + 1) % self.slots_per_rank
            consumed[nxt] += 1
            remaining[nxt] -= 1
            nxt = (nxt + 1) % self.slots_per_rank
        plan = []
        for worker in range(self.slots_per_rank):
            slot = (nxt + worker) % self.slots_per_rank
            total = (consumed[slot] + remaining[slot]) * self.batch_size
            plan.append((slot, consumed[slot] * self.batch_size, total))
        return plan

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        return DataLoader(_SlotStream(self, epoch, skip_batches), batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=False, drop_last=True,
                          worker_init_fn=ignore_stop_signals,
                          pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.num_workers else None)


# --------------------------------------------------------------------------- evaluation reading


class ShardEvalStream(IterableDataset):
    """Every sample of a split exactly once over all ranks: sample i goes to rank i % world_size."""

    def __init__(self, split: ShardSplit, transform: Callable[[Image.Image], torch.Tensor], rank: int,
                 world_size: int):
        self.split, self.transform, self.rank, self.world_size = split, transform, rank, world_size
        self.offsets = [sum(split.shard_sizes[:i]) for i in range(len(split.shard_sizes))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in range(worker, len(self.split.shard_names), workers):
            url = str(self.split.root / self.split.shard_names[shard])
            for pos, sample in enumerate(wds.tarfile_to_samples()([{"url": url}])):
                index = self.offsets[shard] + pos
                if index % self.world_size == self.rank:
                    yield self.transform(decode_image(sample)), int(sample["cls"]), index

    @classmethod
    def for_split(cls, split: ShardSplit) -> Callable[..., "ShardEvalStream"]:
        return lambda transform, rank, world_size: cls(split, transform, rank, world_size)
