"""Optimizers and LR schedules from config (schedules count optimizer steps)."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2

from disttrain.config import BatchConfig, OptimizerConfig


def effective_lr(optim: OptimizerConfig, batch: BatchConfig) -> float:
    """optim.lr is for batch.reference_size; scale it only if the user asked (batch.scale_lr)."""
    ratio = batch.global_size / (batch.reference_size or batch.global_size)
    return optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[batch.scale_lr]


def build_optimizer(optim: OptimizerConfig, batch: BatchConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # timm: "momentum" is plain SGD with momentum, "sgd" its Nesterov variant; no decay on norms/biases
    name = {"sgd": "sgd" if optim.nesterov else "momentum", "adam": "adam", "adamw": "adamw"}[optim.name]
    extra = {"momentum": optim.momentum} if optim.name == "sgd" else {}
    return create_optimizer_v2(model, opt=name, lr=effective_lr(optim, batch), weight_decay=optim.weight_decay,
                               **extra)


def build_schedule(optim: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up, then cosine to zero (SGDR without restarts) or constant."""
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
