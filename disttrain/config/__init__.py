"""Typed stage configs: one dataclass per stage, named presets, `key=value` overrides.

A recipe calls `parse_cli(TrainClassifierConfig, sys.argv[1:])`. The result is a fully
resolved, validated dataclass; every mistake a user can make on the command line
(unknown key, wrong type, value outside its choices, an impossible combination) raises
`ConfigError` naming the key and what is allowed, before anything is built.

Checks that need the world size (global batch divisibility) live in
`BatchConfig.check_world_size`, called by the runtime right after the process group
exists and before any model is built.

The package, by what each module holds (everything is re-exported here, so `from
disttrain.config import X` and `config.X` name any of it):

    parse.py       the key=value parser: overrides, coercion, required and range checks, resolve / build,
                   describe / --help / --print-config, save / load of config.json
    stages.py      the stage registry: every stage's config class and presets (`stage_configs`, `PRESETS`)
    sections.py    the sections several stages share (batch, runtime, checkpoint, tracking, optimizer,
                   loop length, model, classifier data) and `REQUIRED`; a leaf
    classifier.py  train_classifier, its debug / demo presets and the preset blocks the others reuse
    mixupoe.py     outlier exposure (mixupoe.txt): finetune_oe, sweep_oe, the benchmarks' Standard classifiers
    cmg.py         class-mixed generation (cmg.txt): train_cvae, synthesize, finetune_head, stage-1 classifiers
    evaluation.py  evaluate and report
    benchmarks.py  benchmark and benchmark_data

`ConfigError` lives in `disttrain.errors`, with the data layer's `DataError`.
"""

from disttrain.config.benchmarks import BenchmarkConfig, BenchmarkDataConfig
from disttrain.config.classifier import TrainClassifierConfig
from disttrain.config.cmg import (CMGEnergyConfig, CMGSynthesisConfig, CVAEConfig, FinetuneHeadConfig,
                                  GeneratorDataConfig, PseudoStreamConfig, SynthesizeConfig, TrainCVAEConfig)
from disttrain.config.evaluation import EvaluateConfig, ReportConfig
from disttrain.config.mixupoe import (MIXUP_OE_TERMS, EnergyOEObjectiveConfig, FinetuneOEConfig,
                                      MixupOEObjectiveConfig, OEObjectiveConfig, OutlierConfig, SweepOEConfig,
                                      sweep_choice)
from disttrain.config.parse import (_coerce, build, describe, keys_of, load, parse_cli, resolve, save, set_key,
                                    to_dict, usage)
from disttrain.config.sections import (REQUIRED, BatchConfig, CheckpointConfig, ClassifierDataConfig, ModelConfig,
                                       OptimizerConfig, RuntimeConfig, TrackingConfig, TrainLoopConfig)
from disttrain.config.stages import PRESETS, STAGE_CONFIGS, presets_for, stage_configs
from disttrain.errors import ConfigError

__all__ = [
    # errors
    "ConfigError",
    # parsing
    "_coerce", "build", "describe", "keys_of", "load", "parse_cli", "resolve", "save", "set_key", "to_dict", "usage",
    # the registry
    "PRESETS", "STAGE_CONFIGS", "presets_for", "stage_configs",
    # shared sections
    "REQUIRED", "BatchConfig", "CheckpointConfig", "ClassifierDataConfig", "ModelConfig", "OptimizerConfig",
    "RuntimeConfig", "TrackingConfig", "TrainLoopConfig",
    # stages and their own sections
    "TrainClassifierConfig",
    "MIXUP_OE_TERMS", "EnergyOEObjectiveConfig", "FinetuneOEConfig", "MixupOEObjectiveConfig", "OEObjectiveConfig",
    "OutlierConfig", "SweepOEConfig", "sweep_choice",
    "CMGEnergyConfig", "CMGSynthesisConfig", "CVAEConfig", "FinetuneHeadConfig", "GeneratorDataConfig",
    "PseudoStreamConfig", "SynthesizeConfig", "TrainCVAEConfig",
    "EvaluateConfig", "ReportConfig",
    "BenchmarkConfig", "BenchmarkDataConfig",
]
