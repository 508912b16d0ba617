"""Typed stage configs: one dataclass per stage, named presets, `key=value` overrides.

A recipe calls `parse_cli(TrainClassifierConfig, sys.argv[1:])`. The result is a fully
resolved, validated dataclass; every mistake a user can make on the command line
(unknown key, wrong type, value outside its choices, an impossible combination) raises
`ConfigError` naming the key and what is allowed, before anything is built.

Checks that need the world size (global batch divisibility) live in
`BatchConfig.check_world_size`, called by the runtime right after the process group
exists and before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from disttrain import files

REQUIRED = "???"  # a required string field that no preset filled in


class ConfigError(ValueError):
    """A configuration mistake, reported before any compute starts."""


# --------------------------------------------------------------------------- shared sections


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


# --------------------------------------------------------------------------- train_classifier


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


@dataclass
class TrainClassifierConfig:
    run_dir: str = REQUIRED
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "train_classifier"

    def validate(self) -> None:
        if self.model.pretrained and not self.model.pretrained_file:
            raise ConfigError(
                "model.pretrained=true needs model.pretrained_file=<local weights file> "
                "(weights are never downloaded at run time); or set model.pretrained=false"
            )
        if self.data.image_size > self.data.resize_size:
            raise ConfigError(
                f"data.image_size={self.data.image_size} is larger than data.resize_size="
                f"{self.data.resize_size}: the crop must fit inside the resized image"
            )
        if self.data.augment == "pad_crop" and self.data.resize_size != self.data.image_size:
            raise ConfigError(
                f"data.augment=pad_crop trains on whole {self.data.image_size} px images; set data.resize_size="
                f"{self.data.image_size} too, so evaluation sees whole images (not a centre crop)"
            )
        if self.train.num_epochs <= 0 and self.train.max_steps <= 0:
            raise ConfigError("set train.num_epochs > 0 or train.max_steps > 0")


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateConfig:
    """Score ID and OOD sets with post-hoc scorers on a trained classifier."""

    run_dir: str = REQUIRED
    model: str = REQUIRED  # run dir of a finished classifier stage (it holds model/)
    id: str = REQUIRED  # ID test set: a shard split, an image folder
    ood: list[str] = field(default_factory=list)  # OOD sets: shard splits, image folders, noise:gaussian|uniform[:N]
    fit: str = ""  # ID training split for scorers fitted on ID statistics (never the test set)
    fit_max_samples: int = 0  # 0 = the whole fit split
    scorers: list[str] = field(default_factory=lambda: ["msp", "energy"])
    scorer_args: list[str] = field(default_factory=list)  # e.g. [odin.temperature=1000,mahalanobis.use_blocks=true]
    use_ema: bool = False  # score with the EMA weights the classifier stage saved
    interpolate: list[float] = field(default_factory=list)  # extra OOD sets lam * x_id + (1 - lam) * x_ood (Fig. 4)
    interpolate_with: str = ""  # the OOD set mixed in (one of ood, e.g. Places365); empty: the last of ood
    interpolate_max: int = 1000  # interpolated samples per weight (0: as many as ID test images)
    base_rate: str = "5"  # ID:OOD ratio of every evaluation (mixupoe.txt App. C: 5), or "all"
    num_draws: int = 5  # seeded subsamples at that ratio; the table shows mean +- std
    batch_size: int = 64  # images per forward, per rank
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # of an evaluation set's images that may be unreadable (skipped, counted)
    plots: bool = True
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress_bar=False))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "evaluate"

    def validate(self) -> None:
        if not self.ood:
            raise ConfigError("ood=[...] is required: at least one OOD set (e.g. ood=[demo_data/holdout,noise:gaussian])")
        if not self.scorers:
            raise ConfigError("scorers=[...] is empty: name at least one (e.g. scorers=[msp,energy])")
        if self.base_rate != "all":
            try:
                ok = float(self.base_rate) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"base_rate={self.base_rate!r}: expected an ID:OOD ratio > 0 (like 5) or 'all'")
        if self.batch_size < 1 or self.num_draws < 1:
            raise ConfigError("batch_size and num_draws must be >= 1")
        bad = [lam for lam in self.interpolate if not 0.0 <= lam <= 1.0]
        if bad:
            raise ConfigError(f"interpolate={self.interpolate}: weights must lie in [0, 1], got {bad}")
        if self.interpolate and self.interpolate_with and self.interpolate_with not in self.ood:
            raise ConfigError(f"interpolate_with={self.interpolate_with!r} is not one of ood={self.ood}")


# --------------------------------------------------------------------------- finetune_oe


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
        self.trial_overrides()  # every trial's finetune_oe config must build: errors now, not after trial 3

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
        """The finetune_oe overrides of every trial (the grid's cartesian product), each checked."""
        import itertools

        keys, value_lists = zip(*self.grid_values())
        shared = dict(item.split("=", 1) for item in self.finetune)
        trials = [dict(zip(keys, values)) for values in itertools.product(*value_lists)]
        for trial in trials:
            build(FinetuneOEConfig, self.finetune_preset or None, {"run_dir": "-", **shared, **trial})
        return trials


def sweep_choice(sweep_dir: str) -> list[str]:
    """The key=value overrides a finished sweep_oe run chose (its chosen.json)."""
    path = Path(sweep_dir) / "chosen.json"
    if not path.is_file():
        raise ConfigError(f"hparams_from={sweep_dir!r} holds no chosen.json: point at a finished sweep_oe run dir")
    return [f"{k}={v}" for k, v in json.loads(path.read_text())["overrides"].items()]


# --------------------------------------------------------------------------- CMG: train_cvae, synthesize, finetune_head


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


# --------------------------------------------------------------------------- report


@dataclass
class ReportConfig:
    """The paper's tables (mixupoe.txt Tables 5, 6) and confidence densities (Figs. 3, 4, 6) from
    evaluate runs of several methods and seeds."""

    run_dir: str = REQUIRED
    evaluations: list[str] = field(default_factory=list)  # evaluate run dirs: any methods, seeds, benchmarks
    standard_scorers: list[str] = field(default_factory=lambda: ["msp", "odin", "energy", "mahalanobis", "gram"])
    density_scorer: str = "msp"  # confidence = max softmax probability
    plots: bool = True
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress_bar=False))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    STAGE: typing.ClassVar[str] = "report"

    def validate(self) -> None:
        if not self.evaluations:
            raise ConfigError("evaluations=[...] is empty: list the evaluate run dirs to tabulate")


# --------------------------------------------------------------------------- benchmark


@dataclass
class BenchmarkConfig:
    """The shared loop against a bare PyTorch loop: same model, batch and data, same process."""

    run_dir: str = "runs/benchmark"
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

# Presets are override dicts applied on the dataclass defaults, by stage then by name.
# Paper-scale presets follow mixupoe.txt App. D.1 (batch 32, cosine from 1e-3, 512 -> 448).
_DEMO_CLASSIFIER = {
    "run_dir": "runs/train_classifier/demo",
    "data.root": "demo_data",
    "data.image_size": 32,
    "data.resize_size": 36,
    "data.num_workers": 1,
    # lr 0.05, not 0.1: at 0.1 training was erratic (48-94 % test accuracy by seed) and leaned on wing colour
    # and crest, so the held-out species came out *more* confident than the test set (MSP AUROC 35). At 0.05
    # the ImageNet stem (/32: a 1x1 final map at 32 px, the least the model check admits) gave 99.0 % and
    # MSP AUROC 89.5 on the held-out species; model.stem=no_maxpool (2x2) took 1.7x as long and gave 97.2 %
    # and 55.7 (one seed each, 2 gloo ranks); model.stem=small (4x4) would cost ~7x
    "model.name": "resnet10t",
    "optim.lr": 0.05,
    "optim.warmup_steps": 20,
    "batch.global_size": 64,
    "batch.micro_size": 32,
    "train.num_epochs": 16,
    "runtime.log_every": 10,
    "checkpoint.every_minutes": 5.0,
}

_DEMO_FINETUNE = {
    **{k: v for k, v in _DEMO_CLASSIFIER.items() if k.startswith(("data.", "batch.", "runtime.", "checkpoint."))},
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
    **{k: v for k, v in _DEMO_CLASSIFIER.items() if k.startswith(("data.", "runtime.", "checkpoint."))},
    "run_dir": "runs/finetune_head/demo", "classifier": "runs/train_classifier/demo",
    "pseudo": "runs/synthesize/demo", "batch.global_size": 64, "batch.micro_size": 32,
    "pseudo_ood.batch_size": 64, "pseudo_ood.num_workers": 1,
}
# the debug presets' 16 px images: a ResNet's ImageNet stem (/32 in all) would leave less than a pixel
# of image in the last feature map; without the stem's max-pool (/16) it is 1x1
_DEBUG_MODEL = {"model.name": "resnet10t", "model.stem": "no_maxpool"}
_DEBUG_SMALL = {"data.image_size": 16, "data.num_workers": 0, "batch.global_size": 16,
                "batch.micro_size": 8, "train.num_epochs": 1, "train.max_steps": 6, "runtime.log_every": 2,
                "runtime.progress_bar": False, "checkpoint.every_minutes": 0.0}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "train_cvae": {
        "debug": {**_DEMO_CVAE, **_DEBUG_SMALL, "run_dir": "runs/train_cvae/debug", "data.eval_batches": 2,
                  "cvae.latent_dim": 8, "cvae.embed_dim": 8, "train.max_steps": 4},
        "demo": _DEMO_CVAE,
        **{name: {**_CMG_STAGE1, "run_dir": f"runs/train_cvae/{name}", "data.image_size": size,
                  "data.channels": 1 if name == "mnist" else 3,
                  "data.hflip": name in _CMG_FLIPS, "cvae.variant": "small" if name == "mnist" else "resnet18"}
           for name, size in _CMG_DATASETS.items()},
    },
    "synthesize": {
        "debug": {"run_dir": "runs/synthesize/debug", "cvae": "runs/train_cvae/debug",
                  "classifier": "runs/train_classifier/debug", "cmg.count": 96, "batch_size": 32,
                  "samples_per_shard": 16, "grid_size": 16},
        "demo": {"run_dir": "runs/synthesize/demo", "cvae": "runs/train_cvae/demo",
                 "classifier": "runs/train_classifier/demo", "samples_per_shard": 250},
        **{name: {"run_dir": f"runs/synthesize/{name}", "cvae": f"runs/train_cvae/{name}",
                  "classifier": f"runs/train_classifier/{name}", "runtime.precision": "bf16"}
           for name in _CMG_DATASETS},
    },
    "finetune_head": {
        "debug": {**_DEMO_HEAD, **_DEBUG_SMALL, **_DEBUG_MODEL, "run_dir": "runs/finetune_head/debug",
                  "data.resize_size": 18,
                  "classifier": "runs/train_classifier/debug", "pseudo": "runs/synthesize/debug",
                  "pseudo_ood.batch_size": 16, "pseudo_ood.num_workers": 0},
        "demo": _DEMO_HEAD,
        **{name: {**_cmg_data(name), "run_dir": f"runs/finetune_head/{name}",
                  "classifier": f"runs/train_classifier/{name}", "pseudo": f"runs/synthesize/{name}",
                  "runtime.precision": "bf16", "runtime.channels_last": True}
           for name in _CMG_DATASETS},
    },
    "report": {"demo": {"run_dir": "runs/report/demo", "evaluations": [
        "runs/evaluate/demo", "runs/evaluate/demo-oe", "runs/evaluate/demo-mixup_oe"]},
        "cmg_demo": {"run_dir": "runs/report/cmg_demo", "standard_scorers": ["msp", "energy"], "evaluations": [
            "runs/evaluate/cmg_demo", "runs/evaluate/demo-cmg_softmax", "runs/evaluate/demo-cmg_energy"]}},
    # mixupoe.txt D.3, Table 4: alpha_in-out in {0.4, 1, 2} x beta_in-out in {0.5, 1, 5}
    "sweep_oe": {
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
    },
    "finetune_oe": {
        "debug": {**_DEMO_FINETUNE, **_DEBUG_MODEL, "run_dir": "runs/finetune_oe/debug",
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
    },
    "evaluate": {
        "debug": {"run_dir": "runs/evaluate/debug", "batch_size": 32, "num_workers": 0, "num_draws": 3,
                  "fit_max_samples": 256},
        "demo": {"run_dir": "runs/evaluate/demo", "model": "runs/train_classifier/demo", "id": "demo_data/test",
                 "fit": "demo_data/train", "ood": ["demo_data/holdout", "demo_data/far_ood", "noise:gaussian:500"],
                 "scorers": ["msp", "odin", "energy", "maxlogit", "entropy", "mahalanobis", "vim", "react"],
                 "interpolate": [0.5, 0.6, 0.7], "interpolate_with": "demo_data/far_ood", "interpolate_max": 500,
                 "num_workers": 1},
        # cmg.txt 4.1: AUROC over all ID test and OOD images; Table 1's post-hoc baselines next to the
        # model's own score (CMG-s: ood_class, CMG-e: energy, added from the model card)
        "cmg": {"scorers": ["msp", "odin", "energy", "mahalanobis", "react"], "base_rate": "all", "num_draws": 1,
                "runtime.precision": "bf16"},
        # mixupoe.txt 5.1 / App. C-D: holdout classes and coarse sets at 5:1, the paper's scorers
        "mixupoe": {"scorers": ["msp", "odin", "energy", "mahalanobis", "gram"],
                    "scorer_args": ["odin.temperature=1000", "energy.temperature=1", "mahalanobis.use_blocks=true"],
                    "base_rate": "5", "num_draws": 5, "runtime.precision": "bf16"},
    },
    "benchmark": {
        "debug": {"model.name": "resnet10t", "image_size": 32, "num_classes": 10, "num_steps": 4,
                  "warmup_steps": 1, "repeats": 1, "batch.global_size": 4, "batch.micro_size": 4,
                  "tracking.enabled": False},
        "cpu": {"model.name": "resnet18", "image_size": 64, "batch.global_size": 32, "batch.micro_size": 32,
                "num_steps": 50, "repeats": 7},
        "resnet50_448": {"model.name": "resnet50", "image_size": 448, "batch.global_size": 32,
                         "batch.micro_size": 32, "runtime.channels_last": True},
        "resnet50_448_cpu": {"model.name": "resnet50", "image_size": 448, "batch.global_size": 8,
                             "batch.micro_size": 8, "num_steps": 4, "warmup_steps": 1, "repeats": 1},
    },
    "benchmark_data": {
        "debug": {"run_dir": "runs/benchmark_data/debug", "num_images": 64, "samples_per_shard": 16,
                  "batch_size": 16, "num_workers": 0, "image_size": 64, "resize_size": 72, "repeats": 1},
        "cpu": {"num_images": 512, "batch_size": 32, "num_workers": 1, "repeats": 3},
    },
    "train_classifier": {
        "debug": {
            **_DEMO_CLASSIFIER,
            **_DEBUG_MODEL,
            "run_dir": "runs/train_classifier/debug",
            "data.image_size": 16,
            "data.resize_size": 18,
            "data.num_workers": 0,
            "batch.global_size": 16,
            "batch.micro_size": 8,
            "optim.warmup_steps": 0,
            "train.num_epochs": 1,
            "train.max_steps": 6,
            "runtime.log_every": 2,
            "runtime.progress_bar": False,
            "checkpoint.every_minutes": 0.0,
        },
        "demo": _DEMO_CLASSIFIER,
        # cmg.txt 4.3: ResNet-18 (a 3x3 stem for small images) with Adam, batch 512, 200 epochs. The
        # paper's 9-layer CNN (MNIST) and PreActResNet (CIFAR-100) are not timm models: ResNet-18 there too
        **{name: {**_CMG_STAGE1, **_cmg_data(name), "run_dir": f"runs/train_classifier/{name}",
                  "model.name": "resnet18", "model.stem": "small", "runtime.channels_last": True}
           for name in _CMG_DATASETS},
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
    },
}


# --------------------------------------------------------------------------- parsing


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list like [a,b] of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Turn `raw` (a CLI string or a preset value) into a value of type `tp`, or raise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            try:
                if _coerce(key, raw, type(choice)) == choice:
                    return choice
            except ConfigError:
                continue
        raise ConfigError(f"{key}={raw!r} is not allowed: expected {_describe(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(raw, str):
            text = raw.strip()
            if not (text.startswith("[") and text.endswith("]")):
                raise ConfigError(f"{key}={raw!r}: expected {_describe(tp)}")
            raw = [part.strip() for part in text[1:-1].split(",") if part.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}={raw!r}: expected {_describe(tp)}")
        return [_coerce(f"{key}[{i}]", item, item_tp) for i, item in enumerate(raw)]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={raw!r}: expected a bool (true/false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected an int")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an int") from None
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a float") from None
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}={raw!r}: expected a string")
        return raw
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def keys_of(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config dataclass."""
    out = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            out += keys_of(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def set_key(cfg: Any, key: str, raw: Any) -> None:
    """Set a dotted key on a config instance, converting and checking the value."""
    parts = key.split(".")
    node, cls = cfg, type(cfg)
    for depth, part in enumerate(parts):
        types = _field_types(cls)
        if part not in types:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key {key!r}: {where} has {allowed}")
        tp = types[part]
        if depth == len(parts) - 1:
            if _is_dataclass_type(tp):
                raise ConfigError(f"{key!r} is a section; set one of its keys: {', '.join(keys_of(tp, key + '.'))}")
            setattr(node, part, _coerce(key, raw, tp))
            return
        if not _is_dataclass_type(tp):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])!r} is not a section, so {key!r} does not exist")
        node, cls = getattr(node, part), tp


def _check_required(cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_required(value, f"{prefix}{f.name}.")
        elif value == REQUIRED:
            raise ConfigError(f"{prefix}{f.name} is required: pass {prefix}{f.name}=<value> or a --preset that sets it")


def stage_configs() -> dict[str, type]:
    """Every stage's config class by stage name (the recipe's file name): the stage registry."""
    return {obj.STAGE: obj for obj in globals().values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and isinstance(getattr(obj, "STAGE", None), str)}


def presets_for(cls: type) -> dict[str, dict[str, Any]]:
    return PRESETS.get(cls.STAGE, {})


def build(cls: type, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults, then the preset, then the overrides; then validation."""
    cfg = resolve(cls, preset, overrides)
    _check_required(cfg)
    _check_ranges(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# Ranges of numeric fields, by field name wherever it appears: (lowest, lowest allowed?, highest,
# highest allowed?); None is unbounded. A stage's own `validate` adds what depends on several fields.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "global_size": (0, False, None, False), "micro_size": (0, False, None, False),
    "lr": (0, False, None, False), "weight_decay": (0, True, None, False), "momentum": (0, True, 1, False),
    "warmup_steps": (0, True, None, False), "num_epochs": (0, True, None, False), "max_steps": (0, True, None, False),
    "num_workers": (0, True, None, False), "image_size": (1, True, None, False), "resize_size": (1, True, None, False),
    "max_bad_fraction": (0, True, 1, True), "keep_last": (1, True, None, False), "every_steps": (0, True, None, False),
    "every_minutes": (0, True, None, False), "log_every": (1, True, None, False), "eval_every": (0, True, None, False),
    "ema_decay": (0, True, 1, False), "grad_clip": (0, True, None, False), "max_skipped_steps": (0, True, None, False),
    "stall_timeout_minutes": (0, True, None, False), "heartbeat_seconds": (0, False, None, False),
    "stop_grace_seconds": (0, False, None, False),
}


def _check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric field named in `_RANGES` inside its range (NaN never is)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
            continue
        if f.name not in _RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, low_ok, high, high_ok = _RANGES[f.name]
        fits = value == value  # NaN fails
        if low is not None:
            fits = fits and (value >= low if low_ok else value > low)
        if high is not None:
            fits = fits and (value <= high if high_ok else value < high)
        if not fits:
            left = "unbounded" if low is None else f"{'[' if low_ok else '('}{low:g}"
            right = "" if high is None else f", {high:g}{']' if high_ok else ')'}"
            wanted = (f"in {left}{right}" if high is not None
                      else f"{'>=' if low_ok else '>'} {low:g}")
            raise ConfigError(f"{prefix}{f.name}={value} must be {wanted}")


def _parse_args(argv: list[str]) -> tuple[str | None, dict[str, str], set[str]]:
    """(preset, key=value overrides, flags among --help / --print-config)."""
    preset, overrides, flags = None, {}, set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            flags.add("--help")
            continue
        if arg == "--print-config":
            flags.add(arg)
            continue
        if arg == "--preset" or arg.startswith("--preset="):
            preset = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            continue
        if arg.startswith("-") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: expected --preset NAME, key=value, --print-config "
                              f"or --help")
        key, value = arg.split("=", 1)
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
    return preset, overrides, flags


def parse_cli(cls: type, argv: list[str]) -> Any:
    """`--preset NAME key=value ...` -> a validated config.

    `--help` lists the presets and every key with its value (the preset's and the overrides'
    when given); `--print-config` prints the resolved values, then checks them as a run would
    (a ConfigError: exit 2). Neither runs anything; only rank 0 prints.
    """
    preset, overrides, flags = _parse_args(argv)
    if not flags:
        return build(cls, preset, overrides)
    cfg = resolve(cls, preset, overrides)
    if os.environ.get("RANK", "0") == "0":
        print(usage(cls, cfg, preset) if "--help" in flags else describe(cfg, preset), flush=True)
    if "--help" not in flags:
        build(cls, preset, overrides)
    raise SystemExit(0)


def resolve(cls: type, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults, then the preset, then the overrides -- without the checks of `build`."""
    cfg = cls()
    if preset is not None:
        presets = presets_for(cls)
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {cls.STAGE}: choose one of {', '.join(presets)}")
        for key, value in presets[preset].items():
            set_key(cfg, key, value)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    return cfg


def describe(cfg: Any, preset: str | None = None) -> str:
    """The resolved values, one `key = value` per line (a required value nobody set shows as ???)."""
    header = f"# {cfg.STAGE}" + (f" --preset {preset}" if preset else "") + ": resolved config"
    return "\n".join([header, *(f"{key} = {value!r}" for key, value in to_dict(cfg).items())])


def usage(cls: type, cfg: Any = None, preset: str | None = None) -> str:
    cfg = cfg if cfg is not None else cls()
    lines = [f"usage: accelerate launch recipes/{cls.STAGE}.py [--preset NAME] [key=value ...] [--print-config]",
             f"presets: {', '.join(presets_for(cls))}",
             f"keys{f' (with --preset {preset})' if preset else ''}:"]
    flat = to_dict(cfg)
    lines += [f"  {key} = {flat[key]!r}" for key in keys_of(cls)]
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Flat {dotted.key: value}: the form MLflow params and the saved config use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in to_dict(value).items()})
        else:
            out[f.name] = value
    return out


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON, atomically."""
    files.write_text(path, json.dumps({"stage": cfg.STAGE, "config": to_dict(cfg)}, indent=2, sort_keys=True))


def load(cls: type, path: str | os.PathLike) -> Any:
    """Read a config saved by `save` (e.g. from an earlier stage's run dir)."""
    data = json.loads(Path(path).read_text())
    if data.get("stage") != cls.STAGE:
        raise ConfigError(f"{path} holds a {data.get('stage')!r} config, not {cls.STAGE!r}")
    return build(cls, None, data["config"])


