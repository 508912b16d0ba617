"""Class-mixed generation (cmg.txt): train_cvae (stage 1's generator), synthesize (pseudo-OOD images)
and finetune_head (stage 2), with their presets and the presets of the stage-1 classifier on the CMG
datasets (train_classifier)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from disttrain.config.classifier import DEBUG_MODEL, DEBUG_SMALL, DEMO_CLASSIFIER
from disttrain.config.sections import (REQUIRED, BatchConfig, CheckpointConfig, ClassifierDataConfig, ModelConfig,
                                       OptimizerConfig, RuntimeConfig, TrackingConfig, TrainLoopConfig)
from disttrain.errors import ConfigError


@dataclass
class GeneratorDataConfig:
    """A generator's training images: pixels in [0, 1] at the generator's own resolution."""

    root: str = REQUIRED  # a dataset dir with train/ and test/ shard splits
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32  # the generator's resolution (cmg.txt: 28 MNIST, 32 CIFAR/SVHN, 64 TinyImageNet)
    channels: Literal[1, 3] = 3
    hflip: bool = True  # random horizontal flips (off for digits and house numbers)
    num_workers: int = 4
    max_bad_fraction: float = 0.01  # stop when more than this share of the samples is damaged or missing
    verify_checksums: bool = False  # sha256 of every shard against the manifest at start (reads everything)
    eval_batches: int = 20  # test batches per rank for the per-epoch test loss (0: none)


@dataclass
class CVAEConfig:
    variant: Literal["resnet18", "small"] = "resnet18"  # cmg.txt 4.3: resnet18 for CIFAR/SVHN/TinyImageNet, small MNIST
    latent_dim: int = 128
    embed_dim: int = 128  # the class embedding y_c
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # -log p(x | z, c) of Eq. 2


@dataclass
class TrainCVAEConfig:
    """CMG stage 1's generator: a conditional VAE on the ID training split (cmg.txt 3.1, Eq. 2)."""

    run_dir: str = REQUIRED
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig)
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0,
                                                                           schedule="constant"))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(global_size=512, micro_size=512))
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(num_epochs=200))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "train_cvae"

    def validate(self) -> None:
        from disttrain.models.cvae import check_cvae_shape

        problem = check_cvae_shape(self.cvae.variant, self.data.image_size)
        if problem:
            raise ConfigError(f"cvae.variant={self.cvae.variant} / data.image_size={self.data.image_size}: {problem}")
        if self.cvae.latent_dim < 1 or self.cvae.embed_dim < 1:
            raise ConfigError("cvae.latent_dim and cvae.embed_dim must be >= 1")
        if self.train.num_epochs <= 0 and self.train.max_steps <= 0:
            raise ConfigError("set train.num_epochs > 0 or train.max_steps > 0")


@dataclass
class CMGSynthesisConfig:
    sigma: float = 5.0  # z ~ N(0, sigma^2 I) (cmg.txt 4.5: 5; the CVAE trained with 1)
    filter_t: float = 0.0  # > 0: every component of z outside [-t, t] (Fig. 3b/c); 0: no filter (the paper's)
    ratio: float = 1.0  # pseudo-OOD images per ID training image (Fig. 2c; the paper's 1)
    count: int = 0  # > 0: exactly this many images, whatever the ratio


@dataclass
class SynthesizeConfig:
    """Pseudo-OOD images into shards, on every rank (CMG: class-mixed conditions to a CVAE, Eq. 4)."""

    run_dir: str = REQUIRED
    method: Literal["cmg"] = "cmg"
    cvae: str = REQUIRED  # run dir of a finished train_cvae stage
    classifier: str = ""  # run dir of the classifier the data are for: its classes must be the CVAE's
    cmg: CMGSynthesisConfig = field(default_factory=CMGSynthesisConfig)
    batch_size: int = 500  # images per decoder forward, per rank
    samples_per_shard: int = 1000
    grid_size: int = 64  # pseudo-OOD images in the grid logged to MLflow
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress_bar=False))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "synthesize"

    def validate(self) -> None:
        if self.cmg.sigma <= 0:
            raise ConfigError(f"cmg.sigma={self.cmg.sigma} must be > 0 (the paper samples z from N(0, 5^2 I))")
        if self.cmg.filter_t < 0:
            raise ConfigError(f"cmg.filter_t={self.cmg.filter_t} must be >= 0 (0: no filter)")
        if self.cmg.ratio <= 0 and self.cmg.count <= 0:
            raise ConfigError(f"cmg.ratio={self.cmg.ratio} and cmg.count={self.cmg.count} ask for no pseudo-OOD "
                              f"images: set cmg.ratio > 0 (1 = as many as ID training images) or cmg.count > 0")
        if self.batch_size < 1 or self.samples_per_shard < 1 or self.grid_size < 0:
            raise ConfigError("batch_size and samples_per_shard must be >= 1, grid_size >= 0")


@dataclass
class PseudoStreamConfig:
    batch_size: int = 128  # pseudo-OOD images per optimizer step, summed over ranks (cmg.txt 4.3: 128)
    use: bool = True  # false: stage 2 on ID data only (Fig. 2b, cmg_energy's ID hinge alone)
    num_workers: int = 4


@dataclass
class CMGEnergyConfig:
    weight: float = 0.1  # lambda of L_ent + lambda * L_energy (the paper does not give it; Liu et al.'s 0.1)
    temperature: float = 1.0  # T of Eq. 6
    margins: Literal["auto", "fixed"] = "auto"  # auto: from the energies before fine-tuning (cmg.txt 4.3)
    margin_fraction: float = 0.8  # auto: this share of ID and of pseudo-OOD data get a non-zero loss
    m_ind: float = -15.0  # margins=fixed
    m_ood: float = -5.0


@dataclass
class FinetuneHeadConfig:
    """CMG stage 2: fine-tune the last layer of a trained classifier on ID + pseudo-OOD data (cmg.txt 3.3)."""

    run_dir: str = REQUIRED
    method: Literal["cmg_softmax", "cmg_energy"] = "cmg_energy"
    classifier: str = ""  # run dir of a finished classifier stage (train_classifier, finetune_oe, ...)
    pseudo: str = ""  # run dir of a finished synthesize stage (or a shard split of pseudo-OOD images)
    strategy: Literal["frozen", "unfrozen", "direct"] = "frozen"  # Fig. 2a: CMG, unfrozen fine-tuning, one stage
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    pseudo_ood: PseudoStreamConfig = field(default_factory=PseudoStreamConfig)
    cmg_energy: CMGEnergyConfig = field(default_factory=CMGEnergyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # only with strategy=direct
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-4, weight_decay=0.0,
                                                                           schedule="constant"))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(global_size=128, micro_size=128))
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(num_epochs=10))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "finetune_head"

    def validate(self) -> None:
        if self.strategy != "direct" and not self.classifier:
            raise ConfigError(f"strategy={self.strategy} fine-tunes a trained classifier: name it with "
                              f"classifier=<run dir of train_classifier or another classifier stage>")
        if self.pseudo_ood.use and not self.pseudo:
            raise ConfigError("name the pseudo-OOD data with pseudo=<synthesize run dir>, or set "
                              "pseudo_ood.use=false for stage 2 without them")
        if self.method == "cmg_softmax" and not self.pseudo_ood.use:
            raise ConfigError("method=cmg_softmax learns its OOD class from pseudo-OOD data: pseudo_ood.use=false "
                              "leaves it nothing to learn; use method=cmg_energy for stage 2 without pseudo-OOD data")
        if not 0.0 < self.cmg_energy.margin_fraction < 1.0:
            raise ConfigError(f"cmg_energy.margin_fraction={self.cmg_energy.margin_fraction} must lie in (0, 1)")
        if self.cmg_energy.temperature <= 0:
            raise ConfigError(f"cmg_energy.temperature={self.cmg_energy.temperature} must be > 0")
        if self.pseudo_ood.batch_size < 1:
            raise ConfigError(f"pseudo_ood.batch_size={self.pseudo_ood.batch_size} must be >= 1")
        if self.pseudo_ood.batch_size % self.batch.global_size and self.batch.global_size % self.pseudo_ood.batch_size:
            raise ConfigError(f"pseudo_ood.batch_size={self.pseudo_ood.batch_size} and batch.global_size="
                              f"{self.batch.global_size}: one must divide the other")
        if self.train.num_epochs <= 0 and self.train.max_steps <= 0:
            raise ConfigError("set train.num_epochs > 0 or train.max_steps > 0")


# --------------------------------------------------------------------------- presets

# cmg.txt 4.1 / 4.3: stage 1 (classifier and CVAE) with Adam 1e-3 (betas 0.9, 0.999), batch 512,
# 200 epochs; stage 2 with lr 1e-4, 10 epochs, 128 ID + 128 pseudo-OOD per batch; sigma 5.
# MNIST 28 px grey digits (the small CVAE), CIFAR-10 / SVHN / CIFAR-100 32 px, TinyImageNet 64 px.
_CMG_DATASETS = {"mnist": 28, "cifar10": 32, "svhn": 32, "cifar100": 32, "tinyimagenet": 64}
_CMG_FLIPS = {"cifar10", "cifar100", "tinyimagenet"}  # no flips for digits and house numbers
_CMG_STAGE1 = {"optim.name": "adam", "optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.schedule": "constant",
               "batch.global_size": 512, "batch.micro_size": 512, "batch.reference_size": 512,
               "train.num_epochs": 200, "runtime.precision": "bf16"}


def _cmg_data(name: str) -> dict[str, Any]:
    size = _CMG_DATASETS[name]
    return {"data.image_size": size, "data.resize_size": size, "data.augment": "pad_crop",
            "data.hflip": name in _CMG_FLIPS}


_DEMO_CVAE = {"run_dir": "runs/train_cvae/demo", "data.root": "demo_data", "data.image_size": 32,
              "data.hflip": True, "data.num_workers": 1, "data.eval_batches": 4,
              "cvae.variant": "small", "cvae.latent_dim": 16, "cvae.embed_dim": 16, "batch.global_size": 64,
              "batch.micro_size": 32, "train.num_epochs": 20, "runtime.log_every": 10, "checkpoint.every_minutes": 5.0}
_DEMO_HEAD = {
    **{k: v for k, v in DEMO_CLASSIFIER.items() if k.startswith(("data.", "runtime.", "checkpoint."))},
    "run_dir": "runs/finetune_head/demo", "classifier": "runs/train_classifier/demo",
    "pseudo": "runs/synthesize/demo", "batch.global_size": 64, "batch.micro_size": 32,
    "pseudo_ood.batch_size": 64, "pseudo_ood.num_workers": 1,
}

TRAIN_CVAE_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {**_DEMO_CVAE, **DEBUG_SMALL, "run_dir": "runs/train_cvae/debug", "data.eval_batches": 2,
              "cvae.latent_dim": 8, "cvae.embed_dim": 8, "train.max_steps": 4},
    "demo": _DEMO_CVAE,
    **{name: {**_CMG_STAGE1, "run_dir": f"runs/train_cvae/{name}", "data.image_size": size,
              "data.channels": 1 if name == "mnist" else 3,
              "data.hflip": name in _CMG_FLIPS, "cvae.variant": "small" if name == "mnist" else "resnet18"}
       for name, size in _CMG_DATASETS.items()},
}

SYNTHESIZE_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"run_dir": "runs/synthesize/debug", "cvae": "runs/train_cvae/debug",
              "classifier": "runs/train_classifier/debug", "cmg.count": 96, "batch_size": 32,
              "samples_per_shard": 16, "grid_size": 16},
    "demo": {"run_dir": "runs/synthesize/demo", "cvae": "runs/train_cvae/demo",
             "classifier": "runs/train_classifier/demo", "samples_per_shard": 250},
    **{name: {"run_dir": f"runs/synthesize/{name}", "cvae": f"runs/train_cvae/{name}",
              "classifier": f"runs/train_classifier/{name}", "runtime.precision": "bf16"}
       for name in _CMG_DATASETS},
}

FINETUNE_HEAD_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {**_DEMO_HEAD, **DEBUG_SMALL, **DEBUG_MODEL, "run_dir": "runs/finetune_head/debug",
              "data.resize_size": 18,
              "classifier": "runs/train_classifier/debug", "pseudo": "runs/synthesize/debug",
              "pseudo_ood.batch_size": 16, "pseudo_ood.num_workers": 0},
    "demo": _DEMO_HEAD,
    **{name: {**_cmg_data(name), "run_dir": f"runs/finetune_head/{name}",
              "classifier": f"runs/train_classifier/{name}", "pseudo": f"runs/synthesize/{name}",
              "runtime.precision": "bf16", "runtime.channels_last": True}
       for name in _CMG_DATASETS},
}

TRAIN_CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    # cmg.txt 4.3: ResNet-18 (a 3x3 stem for small images) with Adam, batch 512, 200 epochs. The
    # paper's 9-layer CNN (MNIST) and PreActResNet (CIFAR-100) are not timm models: ResNet-18 there too
    **{name: {**_CMG_STAGE1, **_cmg_data(name), "run_dir": f"runs/train_classifier/{name}",
              "model.name": "resnet18", "model.stem": "small", "runtime.channels_last": True}
       for name in _CMG_DATASETS},
}
