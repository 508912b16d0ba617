"""timm classifiers, with ImageNet weights read from a local file only."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from disttrain.config import ConfigError, ModelConfig


def build_classifier(cfg: ModelConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    """Any timm model by name; `pretrained_file` (a .pth/.bin/.safetensors of the timm model's
    weights) initialises everything but the new classifier head. Never touches the network."""
    if cfg.name not in timm.list_models():
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model" + (f"; close: {', '.join(close)}" if close else ""))
    overlay = {}
    if cfg.pretrained:
        path = Path(cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.pretrained_file={cfg.pretrained_file!r} does not exist. Weights are never downloaded at "
                f"run time: put the ImageNet weights of {cfg.name} (e.g. timm's pytorch_model.bin or "
                f"model.safetensors for it) at that path, or set model.pretrained=false")
        overlay = {"file": str(path), "num_classes": 1000}
    model = timm.create_model(cfg.name, pretrained=cfg.pretrained, pretrained_cfg_overlay=overlay or None,
                              num_classes=num_classes, drop_rate=cfg.drop_rate)
    check_image_size(model, cfg.name, image_size)
    return model


def check_image_size(model: torch.nn.Module, name: str, image_size: int) -> None:
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    native = pcfg.get("input_size", (3, image_size, image_size))[-1]
    if pcfg.get("fixed_input_size") and native != image_size:
        raise ConfigError(f"model {name} only takes {native}px inputs but data.image_size={image_size}; "
                          f"set data.image_size={native} or pick a model without a fixed input size")
