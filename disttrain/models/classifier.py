"""timm classifiers, with ImageNet weights read from a local file only."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from disttrain.config import ConfigError, ModelConfig


def check_classifier_config(cfg: ModelConfig, image_size: int) -> None:
    """Model name, weights file and input size, checked without building anything."""
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model" + (f"; close: {', '.join(close)}" if close else ""))
    if cfg.pretrained and not Path(cfg.pretrained_file).expanduser().is_file():
        raise ConfigError(
            f"model.pretrained_file={cfg.pretrained_file!r} does not exist. Weights are never downloaded at "
            f"run time: put the ImageNet weights of {cfg.name} (timm's model.safetensors or pytorch_model.bin "
            f"for it) at that path, or set model.pretrained=false")
    pcfg = timm.get_pretrained_cfg(cfg.name)
    native = pcfg.input_size[-1] if pcfg is not None else image_size
    if pcfg is not None and pcfg.fixed_input_size and native != image_size:
        raise ConfigError(f"model {cfg.name} only takes {native}px inputs but data.image_size={image_size}; "
                          f"set data.image_size={native} or pick a model without a fixed input size")


def build_classifier(cfg: ModelConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    """Any timm model by name; `pretrained_file` initialises everything but the new classifier
    head (timm drops a head whose class count differs). Never touches the network."""
    check_classifier_config(cfg, image_size)
    overlay = {"file": str(Path(cfg.pretrained_file).expanduser()), "num_classes": 1000} if cfg.pretrained else None
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, pretrained_cfg_overlay=overlay,
                             num_classes=num_classes, drop_rate=cfg.drop_rate)
