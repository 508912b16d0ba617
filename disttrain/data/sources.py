"""Evaluation sets by spec: a shard split, a dataset in its own layout, a folder, or generated images.

    demo_data/holdout                   a folder with manifest.json: WebDataset shards
    cifar10:/data/cifar-10-batches-py   a dataset in its distributed layout (`disttrain.data.layouts`),
    svhn:/data/svhn:test                  `layout:root[:split]`; the split defaults to test (or all)
    /data/textures/images               any other folder: every image under it (labels -1)
    noise:gaussian[:N]                  N (default 1000) images of clipped Gaussian noise
    noise:uniform[:N]                   N images of uniform noise
    synthetic:KIND[:N][:ID_SET]         mixupoe.txt D.3 validation outliers (`disttrain.data.synthetic`):
                                          gaussian, rademacher, blobs need no ID_SET; arithmetic_mean,
                                          geometric_mean, speckle, invert, pixelate corrupt images of
                                          ID_SET (any spec above; use ID *training* data, not the test set)

Every source deals sample i to rank i % world_size, and yields (image, label, i), so the
gathered results hold each sample exactly once, in order. An image that cannot be read or
does not decode is skipped -- its index is simply absent -- counted and reported on stderr
(a few lines per process, then silently): one damaged file must not end a run at its final
evaluation. `EvalSource.problems()` gives the counts of the latest pass (see there).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from disttrain.data.layouts import LAYOUTS, Record, layout_names, read_layout
from disttrain.data.shards import (MANIFEST, DataCounters, DataError, ShardEvalStream, ShardSplit,
                                   ignore_stop_signals, my_indices)

Transform = Callable[[Image.Image], torch.Tensor]


def load_record(record: Record, counters: DataCounters) -> Image.Image | None:
    """A record's RGB image, or None (counted) when its file cannot be read or does not decode."""
    if record.path is None:
        return Image.fromarray(record.pixels)
    try:
        data = Path(record.path).read_bytes()
    except OSError as err:
        counters.damaged("unreadable", f"{record.path}: {err}")
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        counters.damaged("corrupt", f"{record.path}: {err}")
        return None


class _RecordStream(IterableDataset):
    def __init__(self, records: list[Record], transform: Transform, rank: int, world_size: int,
                 counters: DataCounters | None = None):
        self.records, self.transform, self.rank, self.world_size = records, transform, rank, world_size
        self.counters = counters if counters is not None else DataCounters(shared=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        for index in my_indices(self, len(self.records), self.rank, self.world_size):
            record = self.records[index]
            image = load_record(record, self.counters)
            if image is not None:
                self.counters.served()
                yield self.transform(image), record.label, index


class _GeneratedStream(IterableDataset):
    """Images made on the fly from their index alone: any rank can make sample i."""

    def __init__(self, make: Callable[[int], np.ndarray], count: int, transform: Transform, rank: int,
                 world_size: int, counters: DataCounters | None = None):
        self.make, self.count, self.transform, self.rank, self.world_size = make, count, transform, rank, world_size
        self.counters = counters if counters is not None else DataCounters(shared=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        for index in my_indices(self, self.count, self.rank, self.world_size):
            self.counters.served()
            yield self.transform(Image.fromarray(self.make(index))), -1, index


def _noise(kind: str, size: int) -> Callable[[int], np.ndarray]:
    def make(index: int) -> np.ndarray:
        g = torch.Generator().manual_seed(index)
        shape = (size, size, 3)
        pixels = (torch.randn(shape, generator=g) * 0.25 + 0.5 if kind == "gaussian"
                  else torch.rand(shape, generator=g)).clamp(0, 1)
        return (pixels * 255).to(torch.uint8).numpy()
    return make


Make = Callable[[Transform, int, int, DataCounters], IterableDataset]


@dataclass
class EvalSource:
    """A named evaluation set; `stream(...)` gives one rank's share."""

    name: str
    spec: str
    num_samples: int
    classes: list[str]
    _make: Make
    manifest_report: dict[str, int] = field(default_factory=dict)  # a shard split's (see SplitIndex.report)
    _counters: DataCounters | None = field(default=None, init=False, repr=False)

    def stream(self, transform: Transform, rank: int, world_size: int,
               counters: DataCounters | None = None) -> IterableDataset:
        """One rank's share; damaged samples are counted in `counters` (default: counters of its own)."""
        return self._make(transform, rank, world_size, counters if counters is not None else DataCounters(False))

    def loader(self, transform: Transform, *, batch_size: int, rank: int, world_size: int,
               num_workers: int) -> DataLoader:
        """Each pass over the loader (each `iter`) starts the counts of `problems()` afresh."""
        if self._counters is None:
            self._counters = DataCounters()  # made here, in the main process, before workers fork
        return _PassLoader(self._counters, self.stream(transform, rank, world_size, self._counters),
                           batch_size=batch_size, num_workers=num_workers, drop_last=False,
                           worker_init_fn=ignore_stop_signals, pin_memory=torch.cuda.is_available(),
                           generator=torch.Generator().manual_seed(rank))  # not a draw from the global RNG

    def problems(self) -> dict[str, int]:
        """`served_samples`, `corrupt_samples`, `unreadable_samples` of the latest pass over a
        `loader` of this source on this rank (all of its workers); counts are reset when a pass
        starts, so read them after the pass (and sum over ranks for the whole set)."""
        return (self._counters.snapshot() if self._counters is not None
                else DataCounters(shared=False).snapshot())

    def most_batches(self, batch_size: int, world_size: int, num_workers: int) -> int:
        """An upper bound on the batches any rank's loader yields: each worker batches its own
        samples, so at most one partial batch per worker beyond the full ones. (Ranks that must
        forward in lock-step pad up to this; an upper bound keeps them in step.)"""
        share = -(-self.num_samples // world_size)
        return -(-share // batch_size) + max(num_workers, 1) - 1

    def images(self, indices: set[int]) -> dict[int, Image.Image]:
        """The decoded RGB images at `indices` (one pass over the set)."""
        out = {}
        stream = self.stream(lambda img: img.convert("RGB"), 0, 1)  # damaged ones: absent from the result
        stream.whole = True  # read by one loader worker on its own
        for image, _, index in stream:
            if index in indices:
                out[index] = image
        return out

    def pixels(self, indices: set[int], size: int) -> dict[int, np.ndarray]:
        """The images at `indices` as size x size uint8 arrays (one pass over the set)."""
        return {i: np.array(img.resize((size, size))) for i, img in self.images(indices).items()}


class _PassLoader(DataLoader):
    """A DataLoader that resets its source's counters at the start of every pass."""

    def __init__(self, counters: DataCounters, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.counters = counters

    def __iter__(self) -> Any:
        self.counters.reset()
        return super().__iter__()


def _records_source(name: str, spec: str, records: list[Record], classes: list[str]) -> EvalSource:
    return EvalSource(name, spec, len(records), classes, lambda t, r, w, c: _RecordStream(records, t, r, w, c))


def _noise_source(spec: str, image_size: int) -> EvalSource:
    parts = spec.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in ("gaussian", "uniform") or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise DataError(f"cannot read noise spec {spec!r}: use noise:gaussian[:N] or noise:uniform[:N]")
    count = int(parts[2]) if len(parts) == 3 else 1000
    if count < 1:
        raise DataError(f"{spec!r} asks for no samples")
    make = _noise(kind, image_size)
    return EvalSource(f"{kind}-noise", spec, count, [], lambda t, r, w, c: _GeneratedStream(make, count, t, r, w, c))


def _synthetic_source(spec: str, image_size: int) -> EvalSource:
    from disttrain.data.synthetic import make_outlier, synthetic_kind

    _, _, rest = spec.partition(":")
    kind_name, _, rest = rest.partition(":")
    count_text, _, id_spec = rest.partition(":") if rest[:1].isdigit() else ("", "", rest)
    kind = synthetic_kind(kind_name)  # an unknown kind: the error lists the known ones
    count = int(count_text) if count_text else 1000
    if kind.needs_id and not id_spec:
        raise DataError(f"{spec!r}: {kind_name} corrupts ID images; use synthetic:{kind_name}:N:<ID training set>")
    if not kind.needs_id:
        return EvalSource(f"synthetic-{kind_name}", spec, count, [], lambda t, r, w, c: _GeneratedStream(
            lambda i: make_outlier(kind_name, i, image_size), count, t, r, w, c))
    id_set = open_source(id_spec, image_size)

    def stream(transform: Transform, rank: int, world_size: int, counters: DataCounters) -> IterableDataset:
        return _SyntheticFromId(kind_name, count, id_set, image_size, transform, rank, world_size, counters)

    return EvalSource(f"synthetic-{kind_name}", spec, count, [], stream)


class _SyntheticFromId(IterableDataset):
    """Corruptions of ID images: reads the ID images this worker needs once, then makes its samples."""

    def __init__(self, kind: str, count: int, id_set: EvalSource, size: int, transform: Transform, rank: int,
                 world_size: int, counters: DataCounters):
        self.kind, self.count, self.id_set, self.size = kind, count, id_set, size
        self.transform, self.rank, self.world_size, self.counters = transform, rank, world_size, counters

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        from disttrain.data.synthetic import id_image_indices, make_outlier

        mine = list(my_indices(self, self.count, self.rank, self.world_size))
        needed = {j for i in mine for j in id_image_indices(self.kind, i, self.id_set.num_samples)}
        pixels = self.id_set.pixels(needed, self.size)
        for index in mine:
            try:
                image = make_outlier(self.kind, index, self.size, id_images=pixels.__getitem__,
                                     num_id=self.id_set.num_samples)
            except KeyError as err:  # an ID image it is made from is damaged (absent from `pixels`)
                self.counters.damaged("corrupt", f"sample {index} of {self.kind}: ID image {err} of "
                                                 f"{self.id_set.spec} is damaged")
                continue
            self.counters.served()
            yield self.transform(Image.fromarray(image)), -1, index


def interpolated_source(id_set: EvalSource, ood_set: EvalSource, lam: float, count: int = 0) -> EvalSource:
    """Pixel-space interpolations lam * x_id + (1 - lam) * x_ood (mixupoe.txt Section 3.3, Fig. 4):
    sample i mixes ID image i with OOD image i mod |OOD|, both through the evaluation transform
    (its normalisation is affine, so mixing after it equals mixing the pixels); `count` caps the
    number (0: as many as ID images)."""
    if not 0.0 <= lam <= 1.0:
        raise DataError(f"interpolation weight {lam} is outside [0, 1]")
    count = min(count, id_set.num_samples) if count else id_set.num_samples

    def stream(transform: Transform, rank: int, world_size: int, counters: DataCounters) -> IterableDataset:
        return _InterpolatedStream(id_set, ood_set, lam, count, transform, rank, world_size, counters)

    return EvalSource(f"interp-{lam:g}", f"interpolate:{lam:g}:{id_set.spec}+{ood_set.spec}", count, [], stream)


class _InterpolatedStream(IterableDataset):
    def __init__(self, id_set: EvalSource, ood_set: EvalSource, lam: float, count: int, transform: Transform,
                 rank: int, world_size: int, counters: DataCounters):
        self.id_set, self.ood_set, self.lam, self.count = id_set, ood_set, lam, count
        self.transform, self.rank, self.world_size, self.counters = transform, rank, world_size, counters

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        mine = list(my_indices(self, self.count, self.rank, self.world_size))
        id_images = self.id_set.images(set(mine))
        ood_images = self.ood_set.images({i % self.ood_set.num_samples for i in mine})
        for index in mine:
            ood_index = index % self.ood_set.num_samples
            if index not in id_images or ood_index not in ood_images:  # damaged in its source set
                self.counters.damaged("corrupt", f"interpolation {index}: ID image {index} of {self.id_set.spec} or "
                                                 f"OOD image {ood_index} of {self.ood_set.spec} is damaged")
                continue
            self.counters.served()
            x_id = self.transform(id_images[index])
            x_ood = self.transform(ood_images[ood_index])
            yield self.lam * x_id + (1 - self.lam) * x_ood, -1, index


def _layout_source(spec: str) -> EvalSource:
    name, _, rest = spec.partition(":")
    root, _, split = rest.rpartition(":") if rest.count(":") else (rest, "", "")
    layout = LAYOUTS[name]
    split = split or ("test" if "test" in layout.splits else "all" if "all" in layout.splits else layout.splits[0])
    listing = read_layout(name, root, split)
    return _records_source(f"{name}-{split}", spec, listing.records, listing.classes)


def open_source(spec: str, image_size: int) -> EvalSource:
    """Parse a spec and check the set is there and non-empty; errors name the spec."""
    if spec.startswith("noise:"):
        return _noise_source(spec, image_size)
    if spec.startswith("synthetic:"):
        return _synthetic_source(spec, image_size)
    prefix = spec.partition(":")[0]
    if ":" in spec and prefix in layout_names():
        return _layout_source(spec)
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"evaluation set {spec!r} does not exist (expected a shard split folder with {MANIFEST}, "
                        f"layout:root[:split] with a layout of {', '.join(layout_names())}, an image folder, "
                        f"noise:gaussian|uniform or synthetic:KIND)")
    if (root / MANIFEST).is_file():
        split = ShardSplit.open(root)
        if split.index.num_samples == 0:
            raise DataError(f"evaluation set {spec!r} is empty (its shards hold no sample)")
        return EvalSource(root.name, spec, split.index.num_samples, split.classes, ShardEvalStream.for_split(split),
                          manifest_report=dict(split.index.report))
    try:
        listing = read_layout("folder", root, "all")
    except DataError as err:
        if "no images found" in str(err):
            raise DataError(f"evaluation set {spec!r} has no images and no {MANIFEST}") from None
        raise DataError(f"evaluation set {spec!r}: {err}") from None
    # No test read of an image here: an unreadable one is skipped and counted like any other.
    return _records_source(root.name, spec, listing.records, [])
