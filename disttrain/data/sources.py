"""Evaluation sets by spec: a shard split, an image folder, or generated noise.

    demo_data/holdout          a folder with manifest.json: WebDataset shards
    /data/textures/images      any other folder: every image under it (labels -1)
    noise:gaussian[:N]         N (default 1000) images of clipped Gaussian noise
    noise:uniform[:N]          N images of uniform noise

Every source deals sample i to rank i % world_size, and yields (image, label, i), so the
gathered results hold each sample exactly once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain.data.shards import MANIFEST, DataError, ShardSplit, ShardEvalStream, ignore_stop_signals

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}
Transform = Callable[[Image.Image], torch.Tensor]


class _FolderStream(IterableDataset):
    def __init__(self, files: list[Path], transform: Transform, rank: int, world_size: int):
        self.files, self.transform, self.rank, self.world_size = files, transform, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(self.rank, len(self.files), self.world_size)
        for position, index in enumerate(mine):
            if position % workers == worker:
                with Image.open(self.files[index]) as img:
                    yield self.transform(img.convert("RGB")), -1, index


class _NoiseStream(IterableDataset):
    """Noise in pixel space, normalised like real images by the same transform."""

    def __init__(self, kind: str, count: int, image_size: int, transform: Transform, rank: int, world_size: int):
        self.kind, self.count, self.size = kind, count, image_size
        self.transform, self.rank, self.world_size = transform, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, index in enumerate(range(self.rank, self.count, self.world_size)):
            if position % workers != worker:
                continue
            g = torch.Generator().manual_seed(index)
            shape = (self.size, self.size, 3)
            pixels = (torch.randn(shape, generator=g) * 0.25 + 0.5 if self.kind == "gaussian"
                      else torch.rand(shape, generator=g)).clamp(0, 1)
            yield self.transform(Image.fromarray((pixels * 255).to(torch.uint8).numpy())), -1, index


@dataclass
class EvalSource:
    """A named evaluation set; `stream(...)` gives one rank's share."""

    name: str
    spec: str
    num_samples: int
    classes: list[str]
    _make: Callable[[Transform, int, int], IterableDataset]

    def stream(self, transform: Transform, rank: int, world_size: int) -> IterableDataset:
        return self._make(transform, rank, world_size)

    def loader(self, transform: Transform, *, batch_size: int, rank: int, world_size: int,
               num_workers: int) -> DataLoader:
        return DataLoader(self.stream(transform, rank, world_size), batch_size=batch_size, num_workers=num_workers,
                          drop_last=False, worker_init_fn=ignore_stop_signals,
                          pin_memory=torch.cuda.is_available())

    def most_batches(self, batch_size: int, world_size: int, num_workers: int) -> int:
        """An upper bound on the batches any rank's loader yields: each worker batches its own
        samples, so at most one partial batch per worker beyond the full ones. (Ranks that must
        forward in lock-step pad up to this; an upper bound keeps them in step.)"""
        share = -(-self.num_samples // world_size)
        return -(-share // batch_size) + max(num_workers, 1) - 1


def open_source(spec: str, image_size: int) -> EvalSource:
    """Parse a spec and check the set is there and non-empty; errors name the spec."""
    if spec.startswith("noise:"):
        parts = spec.split(":")
        kind = parts[1] if len(parts) > 1 else ""
        if kind not in ("gaussian", "uniform") or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
            raise DataError(f"cannot read noise spec {spec!r}: use noise:gaussian[:N] or noise:uniform[:N]")
        count = int(parts[2]) if len(parts) == 3 else 1000
        if count < 1:
            raise DataError(f"{spec!r} asks for no samples")
        return EvalSource(f"{kind}-noise", spec, count, [],
                          lambda t, r, w: _NoiseStream(kind, count, image_size, t, r, w))
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"evaluation set {spec!r} does not exist (expected a shard split folder with "
                        f"{MANIFEST}, an image folder, or noise:gaussian / noise:uniform)")
    if (root / MANIFEST).is_file():
        split = ShardSplit.open(root)
        if split.num_samples == 0:
            raise DataError(f"evaluation set {spec!r} is empty")
        stream = ShardEvalStream.for_split(split)
        return EvalSource(root.name, spec, split.num_samples, split.classes, stream)
    files = sorted(p for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"evaluation set {spec!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no "
                        f"{MANIFEST}")
    try:
        with Image.open(files[0]) as img:
            img.convert("RGB")
    except OSError as err:
        raise DataError(f"evaluation set {spec!r}: cannot read {files[0]} ({err})") from None
    return EvalSource(root.name, spec, len(files), [], lambda t, r, w: _FolderStream(files, t, r, w))
