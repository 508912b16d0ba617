"""The sections several stages share: batch, runtime, checkpoints, tracking, optimizer, loop length,
the timm classifier and its image data. A leaf: it imports nothing of the project but the error types.

`REQUIRED` marks a string field that a preset or `key=value` must fill in (`build` checks it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from disttrain.errors import ConfigError

REQUIRED = "???"  # a required string field that no preset filled in


@dataclass
class BatchConfig:
    global_size: int = 32  # samples per optimizer step summed over all ranks (the paper's batch)
    micro_size: int = 32  # samples per forward pass on one rank; accumulation fills the gap
    reference_size: int = 0  # the batch optim.lr was tuned for (the paper's); 0 = global_size
    scale_lr: Literal["none", "linear", "sqrt"] = "none"  # how lr follows global_size / reference_size

    def grad_accum_steps(self, world_size: int) -> int:
        self.check_world_size(world_size)
        return self.global_size // (world_size * self.micro_size)

    def companion_micro_size(self, per_step: int, key: str, world_size: int) -> int:
        """Micro-batch size of a second stream (outliers, pseudo-OOD) that delivers `per_step`
        samples per optimizer step alongside this one; `key` names its setting in errors."""
        total = per_step * self.micro_size
        if total % self.global_size:
            raise ConfigError(f"{key}={per_step} per optimizer step does not split into micro-batches of "
                              f"batch.micro_size={self.micro_size} out of batch.global_size={self.global_size} on "
                              f"{world_size} processes; pick sizes that divide")
        return total // self.global_size

    def check_world_size(self, world_size: int) -> None:
        per_step = world_size * self.micro_size
        if self.global_size % per_step:
            fits = [m for m in range(1, self.global_size + 1) if self.global_size % (world_size * m) == 0]
            raise ConfigError(
                f"batch.global_size={self.global_size} is not divisible by world size {world_size} "
                f"x batch.micro_size={self.micro_size} (= {per_step}); with {world_size} processes "
                f"batch.micro_size must be one of {fits}"
            )


@dataclass
class RuntimeConfig:
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"  # auto: what `accelerate launch` was told
    deepspeed_config: str = ""  # DeepSpeed JSON; empty: the launcher's, else recipes/deepspeed/zero{zero_stage}.json
    zero_stage: Literal[0, 1, 2, 3] = 0  # 0: the JSON's stage (ZeRO-2 if no JSON is named anywhere)
    seed: int = 0
    channels_last: bool = False
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    nonfinite: Literal["skip", "stop"] = "stop"  # what to do when a loss/grad is NaN or inf
    max_skipped_steps: int = 10  # with nonfinite=skip: stop after this many skipped steps in a row
    ema_decay: float = 0.0  # 0 disables the EMA of weights
    log_every: int = 10  # optimizer steps between metric reductions / tracking writes
    eval_every: int = 0  # optimizer steps between evals; 0 = once per epoch
    progress_bar: bool = True
    # a rank that makes no progress for this long ends the run (exit 75, resumable); 0: never
    stall_timeout_minutes: float = 15.0
    heartbeat_seconds: float = 30.0  # how often status.json says the run is alive
    # after SIGTERM / SIGUSR1 / the launcher's death, the longest wait for the next step boundary
    # (where a checkpoint is written) before the process ends without one -- below the 30 s after
    # which torch's launcher SIGKILLs its workers, so status.json and MLflow still say why; a
    # checkpoint being written is always let finish
    stop_grace_seconds: float = 25.0


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 disables step-based saves
    every_minutes: float = 30.0  # 0 disables time-based saves
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <path to a checkpoint dir>


@dataclass
class TrackingConfig:
    experiment: str = "disttrain"
    run_name: str = ""  # empty: the stage name and the run dir's name
    parent_run_id: str = ""  # the pipeline's parent run; also read from DISTTRAIN_PARENT_RUN_ID
    enabled: bool = True
    system_metrics: bool = True  # MLflow's CPU / memory / GPU sampler on the run (rank 0's host), while online
    register_as: str = ""  # also register the stage's saved model in the MLflow model registry under this name



@dataclass
class ClassifierDataConfig:
    root: str = REQUIRED  # a dataset dir with one shard folder + manifest.json per split
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 448
    resize_size: int = 512  # resize shorter side to this, then crop image_size
    augment: Literal["resize_crop", "pad_crop"] = "resize_crop"  # pad_crop: CIFAR-style, 4 px padding
    hflip: bool = True  # random horizontal flips (off for digits and house numbers)
    num_workers: int = 4
    max_bad_fraction: float = 0.01  # stop when more than this share of the samples is damaged or missing
    verify_checksums: bool = False  # sha256 of every shard against the manifest at start (reads everything)


@dataclass
class ModelConfig:
    name: str = "resnet50"  # any timm model name
    pretrained: bool = False
    pretrained_file: str = ""  # local weights file; required when pretrained=true
    drop_rate: float = 0.0
    # a timm ResNet's stem (disttrain.models.classifier.STEMS): imagenet = the model's own (conv /2 + max-pool /2);
    # no_maxpool = without its max-pool (/2: 32-64 px images at ~1/3 of small's compute, ImageNet weights fit);
    # small = one 3x3 stride-1 conv, no max-pool (/1: the CIFAR ResNet of cmg.txt 4.3)
    stem: Literal["imagenet", "no_maxpool", "small"] = "imagenet"

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of disttrain.models.classifier.build_classifier / check_classifier
        (all but the number of outputs and the image size)."""
        return dataclasses.asdict(self)


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # adam: betas (0.9, 0.999), as in cmg.txt 4.3
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class TrainLoopConfig:
    num_epochs: int = 60
    max_steps: int = 0  # >0 stops after this many optimizer steps (overrides num_epochs' end)

