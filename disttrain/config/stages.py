"""The stage registry: every stage's config class and its presets, gathered from the method families.

Presets are override dicts applied on the dataclass defaults, by stage then by name. Each family
module keeps its stages' presets next to their configs; train_classifier, the first stage of every
method, takes its debug / demo presets from `classifier` and its paper-scale ones from the methods
that train it (`cmg`: the CMG datasets, `mixupoe`: the fine-grained and coarse benchmarks).
"""

from __future__ import annotations

from typing import Any

from disttrain.config import benchmarks, classifier, cmg, evaluation, mixupoe

# every stage, by the module it lives in; a stage is named by its recipe's file name (cls.STAGE)
STAGE_CONFIGS: tuple[type, ...] = (
    classifier.TrainClassifierConfig,
    evaluation.EvaluateConfig,
    mixupoe.FinetuneOEConfig,
    mixupoe.SweepOEConfig,
    cmg.TrainCVAEConfig,
    cmg.SynthesizeConfig,
    cmg.FinetuneHeadConfig,
    evaluation.ReportConfig,
    benchmarks.BenchmarkConfig,
    benchmarks.BenchmarkDataConfig,
)


def _joined(stage: str, *parts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One stage's presets from several families, in order; a name given twice is a mistake."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        twice = sorted(set(out) & set(part))
        if twice:
            raise RuntimeError(f"{stage} presets {twice} are defined by two families")
        out.update(part)
    return out


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "train_cvae": cmg.TRAIN_CVAE_PRESETS,
    "synthesize": cmg.SYNTHESIZE_PRESETS,
    "finetune_head": cmg.FINETUNE_HEAD_PRESETS,
    "report": evaluation.REPORT_PRESETS,
    "sweep_oe": mixupoe.SWEEP_OE_PRESETS,
    "finetune_oe": mixupoe.FINETUNE_OE_PRESETS,
    "evaluate": evaluation.EVALUATE_PRESETS,
    "benchmark": benchmarks.BENCHMARK_PRESETS,
    "benchmark_data": benchmarks.BENCHMARK_DATA_PRESETS,
    "train_classifier": _joined("train_classifier", classifier.TRAIN_CLASSIFIER_PRESETS,
                                cmg.TRAIN_CLASSIFIER_PRESETS, mixupoe.TRAIN_CLASSIFIER_PRESETS),
}


def stage_configs() -> dict[str, type]:
    """Every stage's config class by stage name (the recipe's file name): the stage registry."""
    return {cls.STAGE: cls for cls in STAGE_CONFIGS}


def presets_for(cls: type) -> dict[str, dict[str, Any]]:
    return PRESETS.get(cls.STAGE, {})
