"""Benchmark: the shard data path (ShardReader) against torchvision ImageFolder, same JPEGs.

Generates `num_images` synthetic JPEGs (about 500 x 375, smooth multi-scale noise, so they
weigh 40-90 KB at quality 90 like fine-grained photos) in an ImageFolder layout under
run_dir, shards them with `build_split` (original bytes kept), then times (a) ImageFolder +
DataLoader(shuffle=True) and (b) `ShardReader.loader(epoch)`, both with
train_transform(image_size, resize_size), the same batch size and the same number of
DataLoader workers. One warmup pass each, then the two alternate `repeats` times (the order
flips every repeat). A pass's rate leaves out its first batch (worker start, shuffle-buffer
fill). Reported: median images/s of each, per worker, and the median ratio shards /
ImageFolder of the paired passes (target >= 1.0). Not a test: a measurement to quote.

    .venv/bin/python recipes/benchmark_data.py --preset cpu     # 512 images, 448 px, batch 32, 1 worker
    .venv/bin/python recipes/benchmark_data.py --preset cpu num_workers=2
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from disttrain import config, files
from disttrain.config import BenchmarkDataConfig
from disttrain.data.layouts import read_layout
from disttrain.data.sharding import ShardingOptions, build_split
from disttrain.data.shards import ShardSplit
from disttrain.data.stream import ShardReader
from disttrain.data.transforms import train_transform
from disttrain.runtime import entrypoint


def synthetic_jpeg(rng: np.random.Generator, path: Path, quality: int) -> None:
    """About 500 x 375 (a quarter portrait), noise upsampled from three scales: photo-like JPEG sizes."""
    w = int(rng.integers(400, 601))
    h = int(w * rng.uniform(0.65, 0.85))
    if rng.random() < 0.25:
        w, h = h, w
    pixels = np.full((h, w, 3), 128.0, np.float32)
    for cell, amplitude in ((48, 90.0), (12, 40.0), (3, 18.0)):
        noise = rng.normal(0, 1, (max(h // cell, 2), max(w // cell, 2), 3)).astype(np.float32)
        pixels += amplitude * np.stack([np.asarray(Image.fromarray(noise[..., c], mode="F").resize(
            (w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)


def prepare_data(cfg: BenchmarkDataConfig) -> tuple[Path, Path]:
    """The image folder and its shards, made once per (images, classes, quality, shard size)."""
    data = Path(cfg.run_dir) / f"data_n{cfg.num_images}_c{cfg.num_classes}_q{cfg.jpeg_quality}"
    images, shards = data / "images", data / f"shards_{cfg.samples_per_shard}"
    done = data / ".images_done"
    if not done.is_file():
        rng = np.random.default_rng(0)
        for i in range(cfg.num_images):
            folder = images / f"class_{i % cfg.num_classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_jpeg(rng, folder / f"img_{i:06d}.jpg", cfg.jpeg_quality)
        files.write_text(done, "ok\n")
    build_split(read_layout("imagefolder", images, "all"), shards,
                ShardingOptions(samples_per_shard=cfg.samples_per_shard), progress=False)
    return images, shards


def timed_pass(loader: DataLoader, num_batches: int) -> dict[str, float]:
    """images/s from the first batch's arrival to the last's; the pass's wall time with worker start."""
    start, stamps, images = time.perf_counter(), [], 0
    for batch_index, (x, _) in enumerate(loader):
        stamps.append(time.perf_counter())
        images += len(x) if batch_index else 0
        if batch_index + 1 == num_batches:
            break
    return {"images_per_s": images / (stamps[-1] - stamps[0]), "wall_s": stamps[-1] - start}


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(BenchmarkDataConfig, argv)
    images, shards = prepare_data(cfg)
    transform = train_transform(cfg.image_size, cfg.resize_size)
    folder = ImageFolder(str(images), transform=transform)
    reader = ShardReader(ShardSplit.open(shards), transform, batch_size=cfg.batch_size, rank=0, world_size=1,
                         num_workers=cfg.num_workers, seed=0)
    num_batches = cfg.num_batches or reader.batches_per_epoch
    generator = torch.Generator().manual_seed(0)
    # the DataLoader settings ShardReader.loader uses, so only the dataset differs
    loaders = {
        "imagefolder": lambda epoch: DataLoader(
            folder, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
            generator=generator, pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if cfg.num_workers else None),
        "shards": lambda epoch: reader.loader(epoch),
    }
    for name, make in loaders.items():  # warmup: page cache, imports, first worker fork
        timed_pass(make(0), num_batches)
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for repeat in range(cfg.repeats):
        order = list(loaders) if repeat % 2 == 0 else list(loaders)[::-1]
        for name in order:
            passes[name].append(timed_pass(loaders[name](repeat + 1), num_batches))
            print(f"repeat {repeat + 1}/{cfg.repeats} {name}: {passes[name][-1]['images_per_s']:.1f} images/s",
                  flush=True)

    rates = {name: [p["images_per_s"] for p in runs] for name, runs in passes.items()}
    workers = max(cfg.num_workers, 1)
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = statistics.median(s / f for s, f in zip(rates["shards"], rates["imagefolder"]))
    jpeg_kb = [p.stat().st_size / 1e3 for p in images.rglob("*.jpg")]
    result = {
        "imagefolder_images_per_s": median["imagefolder"], "shards_images_per_s": median["shards"],
        "imagefolder_images_per_s_per_worker": median["imagefolder"] / workers,
        "shards_images_per_s_per_worker": median["shards"] / workers,
        "ratio_shards_over_imagefolder": ratio,
        "num_images": cfg.num_images, "jpeg_kb_median": statistics.median(jpeg_kb),
        "image_size": cfg.image_size, "resize_size": cfg.resize_size, "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers, "batches_per_pass": num_batches, "repeats": cfg.repeats,
        "torch_threads": torch.get_num_threads(), "passes": passes, "config": config.to_dict(cfg),
    }
    files.write_json(Path(cfg.run_dir) / "result.json", result)
    print(f"benchmark_data: imagefolder {median['imagefolder']:.1f} images/s, shards {median['shards']:.1f} "
          f"images/s ({median['imagefolder'] / workers:.1f} / {median['shards'] / workers:.1f} per worker, "
          f"{cfg.num_workers} workers), shards/imagefolder {ratio:.3f} (median of {cfg.repeats} pairs)")
    print(json.dumps({k: v for k, v in result.items() if k not in ("passes", "config")}))


if __name__ == "__main__":
    entrypoint(main)
