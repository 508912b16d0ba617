"""Build the `Accelerator` a stage runs under, from its RuntimeConfig.

The strategy is either named in the config (`runtime.strategy=ddp|fsdp|deepspeed`) or,
with `auto`, taken from what `accelerate launch --config_file recipes/accelerate/*.yaml`
put in the environment. Without CUDA every strategy runs on the CPU over gloo: DDP via
`Accelerator(cpu=True)`; DeepSpeed via its CPU accelerator, which accelerate only allows
with `cpu=False`, so there the backend is forced to gloo instead. A stage with several trained
networks under DeepSpeed gets one engine per network from the one plugin (`Run.prepare`).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from disttrain.config import BatchConfig, ConfigError, RuntimeConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def resolve_strategy(runtime: RuntimeConfig) -> str:
    from_env = ("deepspeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
                else "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else None)
    if runtime.strategy == "auto":
        return from_env or "ddp"
    if from_env and from_env != runtime.strategy:
        raise ConfigError(
            f"runtime.strategy={runtime.strategy} but `accelerate launch` was configured for {from_env}; "
            f"drop one of the two (runtime.strategy=auto follows the launcher)"
        )
    return runtime.strategy


def deepspeed_config(runtime: RuntimeConfig, batch: BatchConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with batch sizes, accumulation, clipping and precision filled in."""
    named = runtime.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    path = Path(named) if named else RECIPES_DIR / "deepspeed" / f"zero{runtime.zero_stage or 2}.json"
    if not path.is_file() and not path.is_absolute() and (RECIPES_DIR.parent / path).is_file():
        path = RECIPES_DIR.parent / path  # launched from elsewhere with the YAMLs' repo-relative path
    if not path.is_file():
        raise ConfigError(f"runtime.deepspeed_config={str(path)!r} does not exist; "
                          f"ready-made ones are in {RECIPES_DIR / 'deepspeed'}")
    ds = json.loads(path.read_text())
    stage = ds.setdefault("zero_optimization", {}).get("stage")
    if runtime.zero_stage and named and stage not in (None, runtime.zero_stage):
        raise ConfigError(f"runtime.zero_stage={runtime.zero_stage} contradicts {path} (stage {stage}); "
                          f"drop runtime.zero_stage or name another JSON")
    ds["zero_optimization"]["stage"] = runtime.zero_stage or stage or 2
    ds["train_micro_batch_size_per_gpu"] = batch.micro_size
    ds["gradient_accumulation_steps"] = batch.grad_accum_steps(world_size)
    ds["train_batch_size"] = batch.global_size
    ds["gradient_clipping"] = runtime.grad_clip
    # bf16 is torch autocast around the forward (Run.autocast), DeepSpeed itself in fp32: its own
    # bf16 casts every weight to bf16 but leaves BatchNorm's running statistics in fp32, which
    # BatchNorm cannot mix
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": runtime.precision == "fp16"}
    # our optimizers are torch's own (SGD included), which ZeRO calls "untested"
    ds["zero_allow_untested_optimizer"] = True
    return ds


def build_accelerator(runtime: RuntimeConfig, batch: BatchConfig | None) -> Accelerator:
    """Process group, device, precision, accumulation and the sharding plugin, from config.

    `batch=None` is a stage that trains nothing (evaluation, synthesis): its frozen networks
    are never wrapped, so it gets the process group and device only.
    """
    strategy = resolve_strategy(runtime) if batch is not None else "ddp"
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would guess, minus its warning
    if runtime.precision == "fp16" and not cuda:
        raise ConfigError("runtime.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accum = batch.grad_accum_steps(world_size) if batch is not None else 1  # ConfigError before any work
    # the watchdog (runtime.stall_timeout_minutes) ends a stalled run first, naming the rank; the
    # process group's own timeout is the backstop. A backend named for a single process would make
    # accelerate look for a process group that is never made.
    timeout = timedelta(minutes=max(30.0, runtime.stall_timeout_minutes + 5))
    handlers = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout)
                ] if world_size > 1 else []
    deepspeed_autocast = strategy == "deepspeed" and runtime.precision == "bf16"  # Run.autocast does it
    kwargs: dict = dict(
        mixed_precision="no" if deepspeed_autocast else _PRECISION[runtime.precision],
        gradient_accumulation_steps=accum,
        # schedules here count optimizer steps; accelerate would otherwise step them world_size times
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    if strategy == "deepspeed":
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(runtime, batch, world_size))
        kwargs["cpu"] = False  # accelerate ignores DeepSpeed when cpu=True; DeepSpeed finds the CPU itself
    else:
        kwargs["cpu"] = not cuda
        if strategy == "fsdp":
            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="SIZE_BASED_WRAP",
                min_num_params=1_000_000, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
            )
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"launcher reported WORLD_SIZE={world_size} but accelerate has "
                           f"{accelerator.num_processes} processes")
    return accelerator
