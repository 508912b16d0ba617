"""Evaluation of trained classifiers, for every method: evaluate (post-hoc scorers on ID and OOD
sets) and report (the papers' tables and plots from evaluate runs), with their presets."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from disttrain.config.sections import REQUIRED, RuntimeConfig, TrackingConfig
from disttrain.errors import ConfigError


@dataclass
class EvaluateConfig:
    """Score ID and OOD sets with a detector: by default a trained classifier with post-hoc scorers."""

    run_dir: str = REQUIRED
    model: str = ""  # run dir of a finished classifier stage (it holds model/)
    detector: str = ""  # run dir of a finished stage whose card names another detector kind (empty: model + scorers)
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
        if not (self.model or self.detector):
            raise ConfigError("model=<run dir of a finished classifier stage> is required (or detector=<run dir of "
                              "a finished stage that saves a detector>)")
        if not self.ood:
            raise ConfigError("ood=[...] is required: at least one OOD set "
                              "(e.g. ood=[demo_data/holdout,noise:gaussian])")
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
    # not tracked: the report reads files and draws tables, no network runs under a runtime setting
    UNTRACKED: typing.ClassVar[tuple[str, ...]] = ("runtime.", "resolved.strategy", "resolved.grad_accum_steps")

    def validate(self) -> None:
        if not self.evaluations:
            raise ConfigError("evaluations=[...] is empty: list the evaluate run dirs to tabulate")


# --------------------------------------------------------------------------- presets

EVALUATE_PRESETS: dict[str, dict[str, Any]] = {
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
}

REPORT_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"run_dir": "runs/report/demo", "evaluations": [
        "runs/evaluate/demo", "runs/evaluate/demo-oe", "runs/evaluate/demo-mixup_oe"]},
    "cmg_demo": {"run_dir": "runs/report/cmg_demo", "standard_scorers": ["msp", "energy"], "evaluations": [
        "runs/evaluate/cmg_demo", "runs/evaluate/demo-cmg_softmax", "runs/evaluate/demo-cmg_energy"]},
}
