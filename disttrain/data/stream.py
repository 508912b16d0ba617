"""Training streams over shard splits: exact epochs, a resampled outlier stream, resume.

Why sample-level: real datasets arrive sorted by class (one folder per class, converted in
that order, sometimes into a single shard). A stream that lays shards end to end and hands
each rank a contiguous range, shuffling only within a small buffer, then deals every rank a
few classes and every batch one or two: BatchNorm learns skewed statistics and accuracy
falls with no warning. So both streams choose *samples*, not shards, at random, and read
each one directly through the split's sample index (`disttrain.data.tarindex.SplitIndex`:
one `pread` per sample, shard files kept open in a small per-worker LRU).

`ShardReader` (one pass per epoch). Each epoch the positions 0..N-1 of the split's N
samples (as the shards hold them, whatever the manifest says) are permuted with a
generator seeded by (seed, epoch), the same on every rank. Rank r takes positions
[r * n, (r + 1) * n) of that permutation, with n = (N // (world x batch)) x batch: a
random subset, so an epoch has exactly N // (world x batch) micro-batches on every rank
and no sample is read twice. Within a rank, the positions are dealt in whole batches to
the DataLoader workers ("slots") in order. The fewer than world x batch positions left
over are the reserve that replaces damaged samples (then the permutation from its start).

`OutlierStream` (resampled, e.g. WebVision outliers for OE). Each slot draws sample
positions uniformly with replacement (seeded by seed, "outliers", epoch, rank, slot) among
the samples of the kept classes (by the labels in the index), for as many batches as the
user asks *per rank* (`batches_per_epoch`), split over workers.

Both yield (image, label) batches whose order is a pure function of (seed, epoch, rank)
and resume at micro-batch K by skipping, undecoded, what each worker had served and
rotating the workers so the DataLoader's round-robin continues where it stopped.
Augmentation randomness is seeded per sample.

Damaged data: a sample whose bytes cannot be read (`unreadable_samples`: file cut short,
I/O error) or whose image or label does not decode (`corrupt_samples`) is skipped,
counted with the samples served (`problems()`, logged to tracking by the loop; additive
over ranks) and reported on stderr; the slot fills its quota from the reserve, so batch
counts stay equal on all ranks. `check_damage` stops a run whose damaged share passes a
threshold. (A resumed run skips served samples without decoding them, so after damaged
samples the ones that replace them may differ from the uninterrupted run's.) Samples the
manifest lists but the shards do not hold are reported when the stream is made
(`manifest_report`), and stop it there when they pass `max_bad_fraction`. A shard missing
on disk is an error naming it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain.data.shards import (
    COUNTERS,
    DataCounters,
    DataError,
    ShardSplit,
    decode_sample,
    ignore_stop_signals,
    read_sample,
    seed_of,
    tell,
)
from disttrain.data.tarindex import ShardFiles

Transform = Callable[[Image.Image], torch.Tensor]
PROBLEMS = COUNTERS  # the keys of `problems()`
_DAMAGE_GRACE = 1000  # the share is taken of at least this many samples: one early bad one must not stop a run


def check_damage(counts: dict[str, float], max_bad_fraction: float, what: str) -> None:
    """Raise DataError when damaged samples are more than `max_bad_fraction` of those read.

    `counts`: one stream's `served_samples`, `corrupt_samples`, `unreadable_samples` (summed
    over ranks; select a prefixed stream's keys first); `what` names the stream in the message
    (a split's root, an evaluation spec, "outliers"). Below
    `_DAMAGE_GRACE` samples read the share is taken of that many, so a single early bad
    sample does not stop a run; `max_bad_fraction=0` stops at any.
    """
    corrupt, unreadable = counts.get("corrupt_samples", 0), counts.get("unreadable_samples", 0)
    bad = corrupt + unreadable
    read = counts.get("served_samples", 0) + bad
    if bad > max_bad_fraction * max(read, _DAMAGE_GRACE):
        split = what if Path(what).is_dir() else "<split>"
        raise DataError(f"{what}: {bad:g} of the {read:g} samples read so far are damaged ({corrupt:g} do not "
                        f"decode, {unreadable:g} cannot be read), more than data.max_bad_fraction={max_bad_fraction:g} "
                        f"allows; find them with `disttrain shards verify {split}`, or raise data.max_bad_fraction")


class _StreamBase:
    """What both streams share: per-slot quotas of whole batches, resume plans, serving."""

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, max_bad_fraction: float):
        self.split = split
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)
        self.seed = seed
        self.index = split.index  # built once here, in the main process: forked workers share its arrays
        self.num_samples = self.index.num_samples
        self.manifest_report = dict(self.index.report)
        self._problems = DataCounters()
        missing, listed = self.manifest_report["missing_samples"], self.manifest_report["listed_samples"]
        if missing > max_bad_fraction * listed:
            raise DataError(f"{split.root}: {missing} of the {listed} samples its manifest lists are not in the "
                            f"shards, more than max_bad_fraction={max_bad_fraction:g} allows (data.max_bad_fraction "
                            f"in a recipe); see what is missing with `disttrain shards verify {split.root}`, rebuild "
                            f"the split with `disttrain shards build`")

    batches_per_epoch: int

    def manifest_counts(self, prefix: str = "") -> dict[str, int]:
        """The manifest's disagreements with the shards, for a stage's summary (`data/<prefix>...`)."""
        return {f"data/{prefix}{key}": int(self.manifest_report[key]) for key in ("missing_samples", "unlisted_samples")}

    def problems(self) -> dict[str, int]:
        """Samples served and damaged ones skipped so far on this rank (all epochs, all workers):
        `served_samples`, `corrupt_samples`, `unreadable_samples`."""
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

    def positions(self, epoch: int, slot: int) -> Iterator[int]:
        """The slot's sample positions in serving order; must not run dry before its quota."""
        raise NotImplementedError

    def serve(self, epoch: int, slot: int, skip: int, quota: int) -> Iterator[tuple[torch.Tensor, int]]:
        if skip >= quota:
            return  # this slot had served all of its share before the checkpoint
        served = skip  # served before the checkpoint: skipped undecoded
        shard_files = ShardFiles(self.split.root, self.split.shard_names)
        try:
            for position in itertools.islice(self.positions(epoch, slot), skip, None):
                sample = read_sample(shard_files, self.index, position, self._problems)
                decoded = decode_sample(sample, self._problems, self.split.num_classes) if sample else None
                if decoded is None:
                    continue
                served += 1
                self._problems.served()
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also seeds every accelerator backend,
                    # a cost per sample that showed in the data benchmark
                    torch.default_generator.manual_seed(seed_of(self.seed, epoch, sample["__key__"]))
                    yield self.transform(decoded[0]), decoded[1]
                if served == quota:
                    return
        finally:
            shard_files.close()
        raise DataError(f"{self.split.root}: ran out of readable samples after {served} of {quota} (too much of "
                        f"the split is damaged; run `disttrain shards verify {self.split.root}`)")

    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        # the workers' base seed from a generator of its own: a DataLoader would draw it from the
        # global RNG, so a resumed run (whose loader starts mid-training) would shift the global
        # stream the training step draws from (noise, latents, mixup) and not match an uninterrupted run
        generator = torch.Generator().manual_seed(seed_of(self.seed, "loader", epoch, self.rank))
        return DataLoader(_SlotStream(self, epoch, skip_batches), batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=False, drop_last=True,
                          worker_init_fn=ignore_stop_signals, generator=generator,
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
    """One pass over a split per epoch, exactly partitioned over ranks and workers, in an order
    drawn at random over all of its samples (whatever order the shards hold them in)."""

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, max_bad_fraction: float = 1.0):
        """`max_bad_fraction`: of the manifest's samples that may be missing from the shards."""
        super().__init__(split, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, max_bad_fraction=max_bad_fraction)
        self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{split.root} has {self.num_samples} samples, fewer than one global batch of "
                            f"{world_size} ranks x {batch_size}; use a smaller batch or more data")
        if rank == 0:
            self._note_source_order()

    def _note_source_order(self) -> None:
        """Say once that a split written in source order (often sorted by class) is read mixed anyway."""
        options = self.split.manifest.get("options")
        if not isinstance(options, dict) or options.get("shuffle_seed", 0) is not None or self.split.num_classes < 2:
            return
        counts = self.split.shard_class_counts()
        single = sum(1 for c in counts if sum(1 for n in c if n) == 1) if counts else 0
        tell("note", f"{self.split.root} was written in source order (`--keep-order`)"
                      + (f", {single} of its {len(counts)} shards hold one class only" if single else "")
                      + "; it is read through a sample-level permutation, so ranks and batches are class-mixed "
                        "anyway")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample positions of `epoch`, permuted: the same on every rank."""
        return np.random.default_rng(seed_of(self.seed, "epoch", epoch)).permutation(self.num_samples)

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[start, end) of `slot` of this rank in the epoch's permutation."""
        per_rank = self.batches_per_epoch * self.batch_size
        batches = self.slot_batches()
        start = self.rank * per_rank + sum(batches[:slot]) * self.batch_size
        return start, start + batches[slot] * self.batch_size

    def rank_positions(self, epoch: int) -> np.ndarray:
        """The sample positions this rank serves in `epoch` (slot by slot; without damaged-sample
        replacements)."""
        per_rank = self.batches_per_epoch * self.batch_size
        return self.epoch_order(epoch)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def positions(self, epoch: int, slot: int) -> Iterator[int]:
        order = self.epoch_order(epoch)
        start, end = self.slot_range(slot)
        # Reserve against damaged samples: the epoch's unassigned tail first, then round again
        # (lazily: it is rarely needed, and a list of every position per worker would weigh)
        tail = self.batches_per_epoch * self.batch_size * self.world_size
        reserve = (int(p) for part in (order[tail:], order[:tail]) for p in part)
        return itertools.chain(order[start:end].tolist(), reserve)


class OutlierStream(_StreamBase):
    """An endless, resampled stream (samples drawn with replacement), cut into epochs of
    `batches_per_epoch` micro-batches per rank."""

    _DRAWS = 512  # positions drawn at a time (a fixed number: the sequence must not depend on it varying)

    def __init__(self, split: ShardSplit, transform: Transform | None, *, batch_size: int, batches_per_epoch: int,
                 rank: int, world_size: int, num_workers: int, seed: int, keep_labels: frozenset[int] | None = None,
                 max_bad_fraction: float = 1.0):
        """`keep_labels`: serve only samples of these classes (None: all), by the labels of the
        split's index; `max_bad_fraction`: of the manifest's samples that may be missing."""
        super().__init__(split, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, max_bad_fraction=max_bad_fraction)
        if batches_per_epoch < 1:
            raise DataError(f"an outlier stream needs at least one batch per epoch (got {batches_per_epoch})")
        self.batches_per_epoch = batches_per_epoch
        self.keep_labels = keep_labels
        self.pool = np.arange(self.num_samples, dtype=np.int64)
        if keep_labels is not None:
            self.pool = np.flatnonzero(np.isin(self.index.labels, sorted(keep_labels)))
        if len(self.pool) == 0:
            what = "of the classes kept for the outlier stream" if keep_labels is not None else "at all"
            raise DataError(f"{split.root}: no sample {what} (the shards hold {self.num_samples} samples)")

    def positions(self, epoch: int, slot: int) -> Iterator[int]:
        rng = np.random.default_rng(seed_of(self.seed, "outliers", epoch, self.rank, slot))
        while True:
            yield from self.pool[rng.integers(0, len(self.pool), self._DRAWS)].tolist()
