"""Training streams over shard splits: exact epochs, a resampled outlier stream, resume.

`ShardReader` (one pass per epoch). Each epoch the shards are permuted with (seed,
epoch) and laid end to end into one sequence of the split's N samples. Rank r reads the
contiguous range [r * n, (r + 1) * n) of it, with n = (N // (world x batch)) x batch, so
an epoch has exactly N // (world x batch) micro-batches on every rank, no sample is read
twice, and the fewer than world x batch samples left over fall at the end of the
sequence, which the next epoch's permutation changes. Within a rank, the range is dealt
in whole batches to the DataLoader workers ("slots"); each slot shuffles its samples
through a buffer seeded with (seed, epoch, rank, slot).

`OutlierStream` (resampled, e.g. WebVision outliers for OE). Each slot draws shards with
replacement (seeded by seed, epoch, rank, slot) and shuffles them through a buffer, for
as many batches as the user asks *per rank* (`batches_per_epoch`), split over workers.

Both yield (image, label) batches whose order is a pure function of (seed, epoch, rank)
and resume at micro-batch K by skipping, undecoded, what each worker had served and
rotating the workers so the DataLoader's round-robin continues where it stopped.
Augmentation randomness is seeded per sample.

Damaged data: a member that does not decode, a sample without an image and a truncated
shard are skipped, counted (`problems()`, logged to tracking by the loop) and reported
on stderr; the slot fills its quota from the samples after the epoch's assigned ranges
(or the next resampled ones), so batch counts stay equal on all ranks. (A resumed run
skips served samples without decoding them, so after damaged members the samples that
replace them may differ from the uninterrupted run's.) A shard missing on disk is an
error naming it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain.data.shards import (
    DataError,
    ShardSplit,
    decode_image,
    ignore_stop_signals,
    seed_of,
)

Transform = Callable[[Image.Image], torch.Tensor]
PROBLEMS = ("corrupt_members", "truncated_shards")
_MAX_WARNINGS = 10  # per worker and epoch; the counters keep counting


class _Problems:
    """Counters shared with DataLoader worker processes."""

    def __init__(self) -> None:
        self._values = multiprocessing.get_context().Array("q", len(PROBLEMS))
        self._warned = 0

    def add(self, kind: str, message: str) -> None:
        with self._values.get_lock():
            self._values[PROBLEMS.index(kind)] += 1
        self.warn(f"skipped {message}")

    def warn(self, message: str) -> None:
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            print(f"disttrain: warning: {message}", file=sys.stderr, flush=True)

    def snapshot(self) -> dict[str, int]:
        return {kind: int(self._values[i]) for i, kind in enumerate(PROBLEMS)}


def _shard_samples(path: Path, problems: _Problems) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order; an unreadable tail ends it (the callers count the samples
    that came up short against the manifest)."""
    if not path.is_file():
        raise DataError(f"shard {path} is missing (listed in its split's manifest)")

    def on_error(err: Exception) -> bool:
        if isinstance(err, (tarfile.TarError, OSError, ValueError, EOFError)):
            problems.warn(f"{path.name} is unreadable from here on: {err}")
            return False  # stop reading this shard
        raise err

    samples = wds.tarfile_to_samples(handler=on_error)([{"url": str(path)}])
    return iter(samples)


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if size <= 1:
            yield sample
            continue
        buffer.append(sample)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


class _StreamBase:
    """What both streams share: per-slot quotas of whole batches, resume plans, serving."""

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle_buffer: int):
        self.split = split
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._problems = _Problems()

    batches_per_epoch: int

    def problems(self) -> dict[str, int]:
        """Damaged data skipped so far on this rank (all epochs, all workers)."""
        return self._problems.snapshot()

    def slot_batches(self) -> list[int]:
        """Whole batches each slot of this rank serves per epoch."""
        base, extra = divmod(self.batches_per_epoch, self.slots_per_rank)
        return [base + (slot < extra) for slot in range(self.slots_per_rank)]

    def epoch_plan(self, skip_batches: int) -> list[tuple[int, int, int]]:
        """(slot, samples to skip, samples to serve) for DataLoader worker 0..W-1.

        Replays the DataLoader's round-robin over slots for `skip_batches` batches, then
        rotates the slots so that worker 0 holds the slot whose batch comes next.
        """
        remaining = self.slot_batches()
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
            plan.append((slot, consumed[slot] * self.batch_size, (consumed[slot] + remaining[slot]) * self.batch_size))
        return plan

    def raw_samples(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        """The slot's raw samples in serving order; must not run dry before its quota."""
        raise NotImplementedError

    def serve(self, epoch: int, slot: int, skip: int, quota: int) -> Iterator[tuple[torch.Tensor, int]]:
        if skip >= quota:
            return  # this slot had served all of its share before the checkpoint
        served = 0
        for sample in self.raw_samples(epoch, slot):
            if served < skip:
                served += 1  # consumed before the checkpoint: skipped undecoded
                continue
            try:
                image, label = decode_image(sample), int(sample["cls"])
            except (OSError, ValueError, SyntaxError, KeyError) as err:
                self._problems.add("corrupt_members", f"{sample.get('__key__')} in {sample.get('__url__')}: {err}")
                continue
            served += 1
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also seeds every accelerator backend,
                # a cost per sample that showed in the data benchmark
                torch.default_generator.manual_seed(seed_of(self.seed, epoch, sample["__key__"]))
                yield self.transform(image), label
            if served == quota:
                return
        raise DataError(f"{self.split.root}: ran out of readable samples after {served} of {quota} (too much of "
                        f"the split is damaged; run `disttrain shards verify {self.split.root}`)")

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        return DataLoader(_SlotStream(self, epoch, skip_batches), batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=False, drop_last=True,
                          worker_init_fn=ignore_stop_signals,
                          pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.num_workers else None)


class _SlotStream(IterableDataset):
    """One epoch of one rank; DataLoader worker w serves the slot its plan gives it."""

    def __init__(self, stream: _StreamBase, epoch: int, skip_batches: int):
        self.stream, self.epoch = stream, epoch
        self.plan = stream.epoch_plan(skip_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        slot, skip, quota = self.plan[info.id if info is not None else 0]
        return self.stream.serve(self.epoch, slot, skip, quota)


class ShardReader(_StreamBase):
    """One pass over a split per epoch, exactly partitioned over ranks and workers."""

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle_buffer: int):
        super().__init__(split, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        self.batches_per_epoch = split.num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{split.root} has {split.num_samples} samples, fewer than one global batch of "
                            f"{world_size} ranks x {batch_size}; use a smaller batch or more data")

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.split.shard_names)))
        random.Random(seed_of(self.seed, "shards", epoch)).shuffle(order)
        return order

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[start, end) of `slot` of this rank in the epoch's sequence of samples."""
        per_rank = self.batches_per_epoch * self.batch_size
        batches = self.slot_batches()
        start = self.rank * per_rank + sum(batches[:slot]) * self.batch_size
        return start, start + batches[slot] * self.batch_size

    def _positions(self, epoch: int, start: int, end: int) -> Iterator[dict[str, Any]]:
        """Samples at sequence positions [start, end) of `epoch` (positions taken modulo N)."""
        order = self.shard_order(epoch)
        sizes = [self.split.shard_sizes[i] for i in order]
        total = self.split.num_samples
        position = start
        while position < end:
            offset, index = position % total, 0
            while offset >= sizes[index]:
                offset -= sizes[index]
                index += 1
            take = min(sizes[index] - offset, end - position)
            path = self.split.root / self.split.shard_names[order[index]]
            got = 0
            for sample in itertools.islice(_shard_samples(path, self._problems), offset, offset + take):
                got += 1
                yield sample
            if got < take:
                self._problems.add("truncated_shards", f"{take - got} samples missing from {path.name} (it holds "
                                   f"fewer than its manifest entry says)")
            position += take  # a truncated shard comes up short; the slot's reserve makes up for it

    def raw_samples(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        start, end = self.slot_range(slot)
        rng = random.Random(seed_of(self.seed, epoch, self.rank, slot))
        own = _shuffled(self._positions(epoch, start, end), self.shuffle_buffer, rng)
        # Reserve against damaged samples: the epoch's unassigned tail first, then round again.
        tail = self.batches_per_epoch * self.batch_size * self.world_size
        reserve = self._positions(epoch, tail, tail + self.split.num_samples)
        return itertools.chain(own, reserve)


class OutlierStream(_StreamBase):
    """An endless, resampled stream (shards drawn with replacement), cut into epochs of
    `batches_per_epoch` micro-batches per rank."""

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, batches_per_epoch: int,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 keep_labels: frozenset[int] | None = None):
        """`keep_labels`: serve only samples of these classes (None: all); shards whose manifest
        entry counts none of them are never drawn."""
        super().__init__(split, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        if batches_per_epoch < 1:
            raise DataError(f"an outlier stream needs at least one batch per epoch (got {batches_per_epoch})")
        self.batches_per_epoch = batches_per_epoch
        self.keep_labels = keep_labels
        self.shards = list(range(len(split.shard_names)))
        if keep_labels is not None:
            entries = split.manifest.get("shards", [])
            self.shards = [i for i in self.shards if "class_counts" not in entries[i]
                           or any(entries[i]["class_counts"][c] for c in keep_labels)]
            if not self.shards:
                raise DataError(f"{split.root}: no shard holds a sample of the classes kept for the outlier stream")

    def _kept(self, sample: dict[str, Any]) -> bool:
        if self.keep_labels is None:
            return True
        try:
            return int(sample.get("cls", -1)) in self.keep_labels
        except (TypeError, ValueError):
            return True  # an unreadable label: serve() counts the sample as damaged

    def raw_samples(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(seed_of(self.seed, "outliers", epoch, self.rank, slot))
        names = self.split.shard_names

        def draws() -> Iterator[dict[str, Any]]:
            for _ in range(1 << 62):
                index = self.shards[rng.randrange(len(self.shards))]
                got = 0
                for sample in _shard_samples(self.split.root / names[index], self._problems):
                    got += 1
                    if self._kept(sample):
                        yield sample
                if got < self.split.shard_sizes[index]:
                    self._problems.add("truncated_shards", f"{self.split.shard_sizes[index] - got} samples "
                                       f"missing from {names[index]}")

        return _shuffled(draws(), self.shuffle_buffer, rng)
