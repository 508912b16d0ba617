"""timm classifiers, with ImageNet weights read from a local file only."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

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
    if cfg.small_input_stem and not cfg.name.startswith(SMALL_STEM_FAMILIES):
        raise ConfigError(f"model.small_input_stem=true swaps a ResNet's stem (conv1 + maxpool); {cfg.name} is not "
                          f"one of the {', '.join(SMALL_STEM_FAMILIES)} families: set model.small_input_stem=false")
    pcfg = timm.get_pretrained_cfg(cfg.name)
    native = pcfg.input_size[-1] if pcfg is not None else image_size
    if pcfg is not None and pcfg.fixed_input_size and native != image_size:
        raise ConfigError(f"model {cfg.name} only takes {native}px inputs but data.image_size={image_size}; "
                          f"set data.image_size={native} or pick a model without a fixed input size")


SMALL_STEM_FAMILIES = ("resnet", "resnext", "wide_resnet", "seresnet")


def use_small_input_stem(net: nn.Module, channels: int = 3) -> nn.Module:
    """A timm ResNet with the CIFAR-style stem: one 3x3 stride-1 convolution, no max-pool, so
    28-64 px images keep their resolution into the first stage."""
    width = net.conv1.out_channels if isinstance(net.conv1, nn.Conv2d) else net.conv1[-1].num_features
    net.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_classifier(cfg: ModelConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    """Any timm model by name; `pretrained_file` initialises everything but the new classifier
    head (timm drops a head whose class count differs). Never touches the network."""
    check_classifier_config(cfg, image_size)
    overlay = {"file": str(Path(cfg.pretrained_file).expanduser()), "num_classes": 1000} if cfg.pretrained else None
    net = timm.create_model(cfg.name, pretrained=cfg.pretrained, pretrained_cfg_overlay=overlay,
                            num_classes=num_classes, drop_rate=cfg.drop_rate)
    return use_small_input_stem(net) if cfg.small_input_stem else net


def split_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A timm classifier as (feature extractor, final linear layer): the extractor is `net` itself
    with its head replaced by the identity, so it returns the pre-logits features."""
    head = net.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(net).__name__}'s classifier is a {type(head).__name__}, not one linear layer")
    net.reset_classifier(0)
    return net, head


def attach_head(net: nn.Module, head: nn.Linear) -> nn.Module:
    """Put a final linear layer (back) into a timm classifier, where its pretrained_cfg says the head is."""
    *path, name = net.pretrained_cfg.get("classifier", "fc").split(".")
    owner = net
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, head)
    net.num_classes = head.out_features
    return net


def widen_head(head: nn.Linear, extra: int) -> nn.Linear:
    """`head` with `extra` more outputs: the old rows copied, the new ones freshly initialised
    (CMG-softmax's (N+1)-th OOD class)."""
    if extra == 0:
        return head
    wider = nn.Linear(head.in_features, head.out_features + extra, device=head.weight.device)
    with torch.no_grad():
        wider.weight[: head.out_features] = head.weight
        wider.bias[: head.out_features] = head.bias
    return wider


class KnownClassLogits(nn.Module):
    """The logits of the ID classes only (the first `num_classes` outputs of `net`)."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net, self.num_classes = net, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[:, : self.num_classes]
