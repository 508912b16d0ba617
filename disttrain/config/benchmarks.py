"""The benchmarks of the shared machinery (not of a method): benchmark (the shared training loop
against a bare PyTorch loop) and benchmark_data (shard reading against torchvision ImageFolder),
with their presets."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from disttrain.config.sections import (BatchConfig, CheckpointConfig, ModelConfig, OptimizerConfig, RuntimeConfig,
                                       TrackingConfig)
from disttrain.errors import ConfigError


@dataclass
class BenchmarkConfig:
    """The shared loop against a bare PyTorch loop: same model, batch and data, same process."""

    run_dir: str = "runs/benchmark"
    # classifier: one network (model.name), one phase; gan: the two-network step of a GAN
    # (disttrain.models.small_gan: G phase + D phase, hinge loss) against a hand-written G/D step
    networks: typing.Literal["classifier", "gan"] = "classifier"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet50"))
    image_size: int = 448
    num_classes: int = 100
    num_steps: int = 20  # timed optimizer steps per repeat
    warmup_steps: int = 3
    repeats: int = 3  # bare and shared loops alternate this many times; the median counts
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress_bar=False, log_every=10))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_minutes=0.0))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "benchmark"

    def validate(self) -> None:
        if self.batch.global_size != self.batch.micro_size:
            raise ConfigError("the benchmark times single-process steps without accumulation: "
                              "set batch.global_size equal to batch.micro_size")


@dataclass
class BenchmarkDataConfig:
    """Shard reading (ShardReader) against torchvision ImageFolder over the same JPEGs, same process."""

    run_dir: str = "runs/benchmark_data"  # work dir: generated images and shards (reused), result.json
    num_images: int = 512  # synthetic JPEGs of about 500 x 375, like fine-grained photos
    num_classes: int = 4
    jpeg_quality: int = 90
    samples_per_shard: int = 64
    image_size: int = 448  # train_transform(image_size, resize_size) on both paths
    resize_size: int = 512
    batch_size: int = 32
    num_workers: int = 1  # DataLoader workers of both paths (1: per-worker throughput)
    num_batches: int = 0  # batches per pass; 0 = the whole epoch
    repeats: int = 3  # ImageFolder and shard passes alternate this many times after a warmup pass each

    STAGE: typing.ClassVar[str] = "benchmark_data"

    def validate(self) -> None:
        if min(self.num_images, self.num_classes, self.batch_size, self.repeats, self.samples_per_shard) < 1:
            raise ConfigError("num_images, num_classes, batch_size, repeats and samples_per_shard must be >= 1")
        if self.num_batches == 1 or self.num_images < 2 * self.batch_size:
            raise ConfigError(f"num_images={self.num_images} or num_batches={self.num_batches} gives fewer "
                              f"than 2 batches of {self.batch_size}: the first batch of a pass is not timed")
        if self.image_size > self.resize_size:
            raise ConfigError(f"image_size={self.image_size} is larger than resize_size={self.resize_size}")


# --------------------------------------------------------------------------- presets

BENCHMARK_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"model.name": "resnet10t", "image_size": 32, "num_classes": 10, "num_steps": 4,
              "warmup_steps": 1, "repeats": 1, "batch.global_size": 4, "batch.micro_size": 4,
              "tracking.enabled": False},
    "cpu": {"model.name": "resnet18", "image_size": 64, "batch.global_size": 32, "batch.micro_size": 32,
            "num_steps": 50, "repeats": 7},
    "gan_cpu": {"networks": "gan", "image_size": 32, "num_classes": 10, "batch.global_size": 32,
                "batch.micro_size": 32, "num_steps": 50, "repeats": 7},
    "resnet50_448": {"model.name": "resnet50", "image_size": 448, "batch.global_size": 32,
                     "batch.micro_size": 32, "runtime.channels_last": True},
    "resnet50_448_cpu": {"model.name": "resnet50", "image_size": 448, "batch.global_size": 8,
                         "batch.micro_size": 8, "num_steps": 4, "warmup_steps": 1, "repeats": 1},
}

BENCHMARK_DATA_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"run_dir": "runs/benchmark_data/debug", "num_images": 64, "samples_per_shard": 16,
              "batch_size": 16, "num_workers": 0, "image_size": 64, "resize_size": 72, "repeats": 1},
    "cpu": {"num_images": 512, "batch_size": 32, "num_workers": 1, "repeats": 3},
}
