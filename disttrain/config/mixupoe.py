"""Outlier exposure (mixupoe.txt): finetune_oe (OE, Energy-OE, MixupOE) and sweep_oe, with their
presets and the paper-scale presets of the Standard classifier they fine-tune (train_classifier on the
fine-grained and coarse benchmarks)."""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from disttrain.config.classifier import DEBUG_MODEL, DEMO_CLASSIFIER
from disttrain.config.sections import (REQUIRED, BatchConfig, CheckpointConfig, ClassifierDataConfig, ModelConfig,
                                       OptimizerConfig, RuntimeConfig, TrackingConfig, TrainLoopConfig)
from disttrain.errors import ConfigError


@dataclass
class OutlierConfig:
    """The outlier-exposure pool (WebVision in the paper): a shard split streamed with replacement."""

    root: str = REQUIRED  # a shard split folder (manifest.json), e.g. built by `disttrain shards build webvision`
    batch_size: int = 32  # outliers per optimizer step, summed over ranks (mixupoe.txt D.1: 32)
    exclude_benchmark: str = ""  # bird|dog|flower|car|aircraft: drop that benchmark's classes at stream time
    exclude_ids: list[str] = field(default_factory=list)  # class ids (WordNet ids) to drop at stream time
    wordnet: str = ""  # folder with wordnet.is_a.txt (+ words.txt) for exclude_benchmark; empty: keywords
    num_workers: int = 4


@dataclass
class OEObjectiveConfig:
    beta: float = 5.0  # Eq. 1 weight of the outliers' CE to uniform (mixupoe.txt D.3: 5, Dog 1)


@dataclass
class EnergyOEObjectiveConfig:
    m_in: float = -15.0  # energy margins (mixupoe.txt D.3, after Liu et al.)
    m_out: float = -5.0
    weight: float = 0.1  # lambda of the squared-hinge energy term
    temperature: float = 1.0


@dataclass
class MixupOEObjectiveConfig:
    terms: list[str] = field(default_factory=lambda: ["id", "id_ood"])  # Eq. 3; any of id, id_id, id_ood, ood (Eq. 2)
    alpha_id_ood: float = 1.0  # lambda ~ Beta(alpha, alpha) of the ID-OOD mixup
    beta_id_ood: float = 5.0  # weight of the ID-OOD term (Dog 1)
    alpha_id_id: float = 1.0
    beta_id_id: float = 1.0
    beta_ood: float = 5.0  # weight of the plain OOD term (the OE term of Eq. 1)
    coarse: bool = False  # Section 5.5 / App. H.2: the ID weight is min(lambda, 1 - lambda)
    lambda_per: Literal["batch", "sample"] = "batch"  # one lambda per batch (mixup's usual) or per sample


@dataclass
class FinetuneOEConfig:
    """Outlier-exposure fine-tuning of a Standard classifier (mixupoe.txt Section 4, App. D)."""

    run_dir: str = REQUIRED
    method: Literal["oe", "energy_oe", "mixup_oe"] = "mixup_oe"
    hparams_from: str = ""  # a finished sweep_oe run dir: its chosen values, under any key=value given here
    standard: str = ""  # run dir of the finished train_classifier stage to fine-tune
    from_scratch: bool = False  # Section 5.4's "scratch" rows: a fresh model (model.*); standard is ignored
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    oe: OEObjectiveConfig = field(default_factory=OEObjectiveConfig)
    energy_oe: EnergyOEObjectiveConfig = field(default_factory=EnergyOEObjectiveConfig)
    mixup_oe: MixupOEObjectiveConfig = field(default_factory=MixupOEObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # only with from_scratch=true
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(num_epochs=10))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "finetune_oe"

    def validate(self) -> None:
        if self.from_scratch:
            self.standard = ""  # a preset's Standard run is not used
        elif not self.standard:
            raise ConfigError("name the Standard classifier to fine-tune with standard=<train_classifier run dir>, "
                              "or set from_scratch=true to train a fresh model")
        if self.from_scratch and self.model.pretrained and not self.model.pretrained_file:
            raise ConfigError("model.pretrained=true needs model.pretrained_file=<local weights file>")
        unknown = sorted(set(self.mixup_oe.terms) - set(MIXUP_OE_TERMS))
        if unknown or not self.mixup_oe.terms:
            raise ConfigError(f"mixup_oe.terms={self.mixup_oe.terms}: expected a non-empty list of "
                              f"{', '.join(MIXUP_OE_TERMS)}")
        for key, value in (("mixup_oe.alpha_id_ood", self.mixup_oe.alpha_id_ood),
                           ("mixup_oe.alpha_id_id", self.mixup_oe.alpha_id_id),
                           ("energy_oe.temperature", self.energy_oe.temperature)):
            if value <= 0:
                raise ConfigError(f"{key}={value} must be > 0")
        if self.outliers.batch_size < 1:
            raise ConfigError(f"outliers.batch_size={self.outliers.batch_size} must be >= 1")
        if self.outliers.batch_size % self.batch.global_size and self.batch.global_size % self.outliers.batch_size:
            raise ConfigError(f"outliers.batch_size={self.outliers.batch_size} and batch.global_size="
                              f"{self.batch.global_size}: one must divide the other, so every micro-batch "
                              f"gets a whole number of outliers")
        if self.train.num_epochs <= 0 and self.train.max_steps <= 0:
            raise ConfigError("set train.num_epochs > 0 or train.max_steps > 0")


MIXUP_OE_TERMS = ("id", "id_id", "id_ood", "ood")


@dataclass
class SweepOEConfig:
    """A grid of finetune_oe trials scored on synthetic validation outliers (mixupoe.txt D.3)."""

    run_dir: str = REQUIRED
    finetune_preset: str = ""  # the finetune_oe preset of every trial
    finetune: list[str] = field(default_factory=list)  # finetune_oe key=value overrides shared by every trial
    grid: list[str] = field(default_factory=list)  # key=v1|v2|... (a finetune_oe key and its values)
    val_kinds: list[str] = field(default_factory=lambda: ["gaussian", "rademacher", "blobs", "arithmetic_mean",
                                                         "geometric_mean", "speckle", "invert", "pixelate"])
    val_count: int = 1000  # images per validation kind (the corruptions use the ID *training* split)
    val: list[str] = field(default_factory=list)  # explicit validation specs instead (synthetic:..., noise:..., dirs)
    id: str = ""  # ID set the validation outliers are scored against; empty: the trials' data.root/eval_split
    max_acc_drop: float = 0.01  # a trial qualifies if its ID accuracy >= the Standard model's minus this
    metric: Literal["aupr_out", "auroc", "fpr95"] = "aupr_out"  # mean over the validation sets picks the trial
    launcher: str = "disttrain launch"  # how each trial's stage starts (e.g. disttrain launch --multi_gpu ...)
    evaluate: list[str] = field(default_factory=list)  # extra evaluate key=value (batch_size=..., num_workers=...)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # the driver only waits for its trials, which have watchdogs of their own: no stall timeout here
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress_bar=False,
                                                                         stall_timeout_minutes=0.0))

    STAGE: typing.ClassVar[str] = "sweep_oe"

    def validate(self) -> None:
        if not self.grid:
            raise ConfigError("grid=[...] is empty: give at least one key=v1|v2 (e.g. mixup_oe.beta_id_ood=1|5)")
        if not self.val and not self.val_kinds:
            raise ConfigError("val_kinds=[] and val=[]: name the synthetic validation outliers "
                              "(e.g. val_kinds=[gaussian,invert] or val=[synthetic:gaussian:500])")
        for item in [*self.grid, *self.finetune]:
            if "=" not in item:
                raise ConfigError(f"{item!r} in grid/finetune: expected key=value (grid: key=v1|v2|...)")

    def validation_sets(self, id_train: str) -> list[str]:
        """The validation specs: `val` as given, else one synthetic set per kind."""
        from disttrain.data.synthetic import synthetic_kind

        if self.val:
            return list(self.val)
        return [f"synthetic:{kind}:{self.val_count}" + (f":{id_train}" if synthetic_kind(kind).needs_id else "")
                for kind in self.val_kinds]

    def grid_values(self) -> list[tuple[str, list[str]]]:
        out = []
        for item in self.grid:
            key, _, values = item.partition("=")
            if not key or not values or any(not v for v in values.split("|")):
                raise ConfigError(f"grid entry {item!r}: expected key=v1|v2|...")
            out.append((key, values.split("|")))
        return out

    def trial_overrides(self) -> list[dict[str, str]]:
        """The finetune_oe overrides of every trial (the grid's cartesian product); recipes/sweep_oe.py
        builds each trial's config before the first one runs."""
        keys, value_lists = zip(*self.grid_values())
        return [dict(zip(keys, values)) for values in itertools.product(*value_lists)]


def sweep_choice(sweep_dir: str) -> list[str]:
    """The key=value overrides a finished sweep_oe run chose (its chosen.json)."""
    path = Path(sweep_dir) / "chosen.json"
    if not path.is_file():
        raise ConfigError(f"hparams_from={sweep_dir!r} holds no chosen.json: point at a finished sweep_oe run dir")
    return [f"{k}={v}" for k, v in json.loads(path.read_text())["overrides"].items()]


# --------------------------------------------------------------------------- presets

_DEMO_FINETUNE = {
    **{k: v for k, v in DEMO_CLASSIFIER.items() if k.startswith(("data.", "batch.", "runtime.", "checkpoint."))},
    "run_dir": "runs/finetune_oe/demo",
    "standard": "runs/train_classifier/demo",
    "outliers.root": "demo_data/outliers",
    "outliers.batch_size": 64,
    "outliers.num_workers": 1,
    "optim.lr": 0.01,
    "train.num_epochs": 5,
}

# mixupoe.txt App. D.1/D.3: 10 epochs from the Standard model, cosine from 1e-3, ID batch 32 +
# outlier batch 32; beta 5 (Dog: 1); Energy-OE m_in -15, m_out -5, lambda 0.1; alpha 1
_PAPER_FINETUNE = {"train.num_epochs": 10, "optim.lr": 1e-3, "optim.schedule": "cosine",
                   "batch.global_size": 32, "batch.micro_size": 32, "batch.reference_size": 32,
                   "outliers.batch_size": 32, "runtime.precision": "bf16", "runtime.channels_last": True}
# App. H.2 (coarse INet-A/B): ResNet-18, ID batch 256 + outlier batch 512, 256 -> 224 px;
# OE beta 0.5; Energy-OE m_in -27, m_out -5, lambda 0.05; MixupOE alpha 0.4, beta 5, lambda' = min(lambda, 1 - lambda)
_COARSE_DATA = {"data.image_size": 224, "data.resize_size": 256}
_COARSE_FINETUNE = {**_PAPER_FINETUNE, **_COARSE_DATA, "batch.global_size": 256, "batch.micro_size": 256,
                    "batch.reference_size": 256, "outliers.batch_size": 512, "oe.beta": 0.5,
                    "energy_oe.m_in": -27.0, "energy_oe.m_out": -5.0, "energy_oe.weight": 0.05,
                    "mixup_oe.alpha_id_ood": 0.4, "mixup_oe.beta_id_ood": 5.0, "mixup_oe.coarse": True}

# mixupoe.txt D.3, Table 4: alpha_in-out in {0.4, 1, 2} x beta_in-out in {0.5, 1, 5}
SWEEP_OE_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {"run_dir": "runs/sweep_oe/debug", "finetune_preset": "debug", "finetune": ["method=mixup_oe"],
              "grid": ["mixup_oe.beta_id_ood=1|5"], "val_kinds": ["gaussian", "invert"], "val_count": 40,
              "evaluate": ["batch_size=32", "num_workers=0"]},
    "demo": {"run_dir": "runs/sweep_oe/demo", "finetune_preset": "demo", "finetune": ["method=mixup_oe"],
             "grid": ["mixup_oe.alpha_id_ood=0.4|1|2", "mixup_oe.beta_id_ood=1|5"], "val_count": 200,
             "evaluate": ["num_workers=1"]},
    **{name: {"run_dir": f"runs/sweep_oe/{name}", "finetune_preset": name, "finetune": ["method=mixup_oe"],
              "grid": ["mixup_oe.alpha_id_ood=0.4|1|2", "mixup_oe.beta_id_ood=0.5|1|5"],
              "evaluate": ["runtime.precision=bf16"]}
       for name in ("bird", "dog", "flower", "car", "aircraft")},
}

FINETUNE_OE_PRESETS: dict[str, dict[str, Any]] = {
    "debug": {**_DEMO_FINETUNE, **DEBUG_MODEL, "run_dir": "runs/finetune_oe/debug",
              "standard": "runs/train_classifier/debug",
              "data.image_size": 16, "data.resize_size": 18, "data.num_workers": 0,
              "outliers.num_workers": 0, "outliers.batch_size": 16,
              "batch.global_size": 16, "batch.micro_size": 8, "train.num_epochs": 1, "train.max_steps": 6,
              "runtime.log_every": 2, "runtime.progress_bar": False, "checkpoint.every_minutes": 0.0},
    "demo": _DEMO_FINETUNE,
    **{name: {**_PAPER_FINETUNE, "run_dir": f"runs/finetune_oe/{name}",
              "standard": f"runs/train_classifier/{name}", "outliers.exclude_benchmark": name,
              "oe.beta": beta, "mixup_oe.beta_id_ood": beta}
       for name, beta in {"bird": 5.0, "dog": 1.0, "flower": 5.0, "car": 5.0, "aircraft": 5.0}.items()},
    **{name: {**_COARSE_FINETUNE, "run_dir": f"runs/finetune_oe/{name}",
              "standard": f"runs/train_classifier/{name}", "outliers.exclude_benchmark": name}
       for name in ("inet_a", "inet_b")},
}

# Paper-scale presets follow mixupoe.txt App. D.1 (batch 32, cosine from 1e-3, 512 -> 448): the Standard
# classifiers of the fine-grained benchmarks, fine-tuned by the finetune_oe presets of the same name
TRAIN_CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    **{
        name: {"run_dir": f"runs/train_classifier/{name}", "model.name": "resnet50", "model.pretrained": True,
               "train.num_epochs": epochs,
               "batch.global_size": 32, "batch.micro_size": 32, "batch.reference_size": 32,
               "runtime.precision": "bf16",
               "runtime.channels_last": True}
        for name, epochs in {"bird": 60, "car": 60, "aircraft": 60, "flower": 30, "dog": 30}.items()
    },
    # mixupoe.txt App. H.2: ResNet-18 on INet-A/B (50 ImageNet classes each), 90 epochs, cosine
    # from 0.1, batch 256, 256 -> 224 px; trained from scratch (ImageNet weights would have seen the OOD set)
    **{name: {**_COARSE_DATA, "run_dir": f"runs/train_classifier/{name}", "model.name": "resnet18",
              "train.num_epochs": 90, "optim.lr": 0.1, "optim.weight_decay": 1e-4, "batch.global_size": 256,
              "batch.micro_size": 256, "batch.reference_size": 256, "runtime.precision": "bf16",
              "runtime.channels_last": True}
       for name in ("inet_a", "inet_b")},
}
