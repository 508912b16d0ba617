"""timm classifiers, with ImageNet weights read from a local file only, and the stems that fit a
ResNet to small (28-64 px) images."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

from disttrain.errors import ConfigError


def check_classifier(name: str, image_size: int, stem: str = "imagenet", drop_rate: float = 0.0,
                     pretrained: bool = False, pretrained_file: str = "") -> None:
    """Model name, weights file, stem and input size (the arguments of `build_classifier`), checked
    before any compute (the size on a weightless meta-device build). The messages name the config
    keys (model.*, data.image_size) a user sets them with."""
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"model.drop_rate={drop_rate} must be in [0, 1)")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={name!r} is not a timm model"
                          + (f"; close: {', '.join(close)}" if close else ""))
    if pretrained and not Path(pretrained_file).expanduser().is_file():
        raise ConfigError(
            f"model.pretrained_file={pretrained_file!r} does not exist. Weights are never downloaded at "
            f"run time: put the ImageNet weights of {name} (timm's model.safetensors or pytorch_model.bin "
            f"for it) at that path, or set model.pretrained=false")
    pcfg = timm.get_pretrained_cfg(name)
    native = pcfg.input_size[-1] if pcfg is not None else image_size
    if pcfg is not None and pcfg.fixed_input_size and native != image_size:
        raise ConfigError(f"model {name} only takes {native}px inputs but data.image_size={image_size}; "
                          f"set data.image_size={native} or pick a model without a fixed input size")
    arch = split_model_name_tag(name)[0]
    if stem != DEFAULT_STEM and arch not in resnet_models():
        raise ConfigError(f"model.stem={stem} replaces the conv1 + maxpool stem of timm's ResNet class, which "
                          f"{name} is not: pick a model of timm.list_models(module='resnet') "
                          f"({', '.join(f + '*' for f in resnet_families())}) or set model.stem={DEFAULT_STEM}")
    reduction = total_reduction(arch, stem)
    if reduction is not None and image_size < reduction:
        # padding keeps every map at least 1x1, so a too small image trains without an error: on padding
        fits = {stem: total_reduction(arch, stem) for stem in STEMS} if arch in resnet_models() else {}
        others = [f"model.stem={stem} (from {least} px)" for stem, least in fits.items()
                  if (least or reduction) < reduction]
        raise ConfigError(f"data.image_size={image_size} is too small for {name} with model.stem={stem}: "
                          f"it downsamples by {reduction}, so its last feature map would hold less than one pixel "
                          f"of image (the rest: padding); use data.image_size >= {reduction} (a 1x1 final map)"
                          + (f", or {' / '.join(others)}" if others else ""))


# --------------------------------------------------------------------------- stems


def use_small_input_stem(net: nn.Module, channels: int | None = None) -> nn.Module:
    """A timm ResNet with the CIFAR-style stem: one 3x3 stride-1 convolution, no max-pool (/1
    instead of /4), so 28-64 px images keep their resolution into the first stage (cmg.txt 4.3).
    conv1 is one 7x7 convolution or, in the deep-stem variants (*c, *d, *s, *t), three 3x3 ones in
    a Sequential; the new one has the width of the last, which bn1 expects. `channels`: the input
    channels (default: the old stem's)."""
    convs = [m for m in net.conv1.modules() if isinstance(m, nn.Conv2d)]
    net.conv1 = nn.Conv2d(channels or convs[0].in_channels, convs[-1].out_channels, kernel_size=3, stride=1,
                          padding=1, bias=False, device=convs[0].weight.device)
    net.maxpool = nn.Identity()
    return _rescale_reductions(net, conv_stride=1)


def drop_stem_pool(net: nn.Module) -> nn.Module:
    """A timm ResNet without its stem's second downsampling (the max-pool; an anti-aliased pool in
    resnetaa / resnetblur, a strided convolution in resnetrs): /2 instead of /4, so a 32 px image
    reaches the first stage at 16 px and the last at 2x2 (not 1x1). A training step of resnet10t on
    32 px costs ~2.3x the ImageNet stem's, ~1/3 of the small stem's. The stem's convolutions, and
    their ImageNet weights, stay."""
    net.maxpool = nn.Identity()
    return _rescale_reductions(net, conv_stride=2)


def _rescale_reductions(net: nn.Module, conv_stride: int) -> nn.Module:
    """Keep timm's feature_info true after a stem swap without a pool: the stem's output is at the
    stem convolution's stride, and every stage's reduction shrinks by what the stem lost."""
    old_stem = next(info["reduction"] for info in net.feature_info if info["module"] == "layer1")
    net.feature_info = [{**info, "reduction": conv_stride if info["module"] == "act1"
                         else info["reduction"] * conv_stride // old_stem} for info in net.feature_info]
    return net


# model.stem -> how a built timm ResNet gets it; the first is the model's own (conv1 /2, maxpool /2)
STEMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "imagenet": lambda net: net,
    "no_maxpool": drop_stem_pool,
    "small": use_small_input_stem,
}
DEFAULT_STEM = next(iter(STEMS))


@functools.cache
def resnet_models() -> frozenset[str]:
    """The models of timm's ResNet class (timm.models.resnet), whose stem is conv1 + maxpool; not
    resnetv2_* (a `stem` module) nor the ByobNets resnext26ts, seresnet33ts, ..."""
    return frozenset(timm.list_models(module="resnet"))


def resnet_families() -> list[str]:
    """resnet_models() by name up to the first digit: resnet, resnext, seresnet, wide_resnet, ..."""
    return sorted({re.match(r"[a-z_]+?(?=\d|$)", name).group(0) for name in resnet_models()})


@functools.cache
def total_reduction(arch: str, stem: str = DEFAULT_STEM) -> int | None:
    """How much timm model `arch` with `stem` downsamples an image into its last feature map (its
    feature_info), read from a build on the meta device (no memory, no weights: a fraction of a second);
    None when timm does not say or the model cannot be built there."""
    try:
        with torch.device("meta"):
            net = STEMS[stem](timm.create_model(arch))
    except Exception:  # a model that needs real tensors to be built: no check rather than a false refusal
        return None
    info = getattr(net, "feature_info", None)
    if not isinstance(info, list) or not info or "reduction" not in info[-1]:
        return None
    return int(info[-1]["reduction"])


def build_classifier(name: str, num_outputs: int, image_size: int, stem: str = "imagenet",
                     drop_rate: float = 0.0, pretrained: bool = False, pretrained_file: str = "") -> torch.nn.Module:
    """Any timm model by name with `num_outputs` logits; with `pretrained`, `pretrained_file`
    initialises everything but the new classifier head (timm drops a head whose class count
    differs). Never touches the network."""
    check_classifier(name, image_size, stem, drop_rate, pretrained, pretrained_file)
    overlay = {"file": str(Path(pretrained_file).expanduser()), "num_classes": 1000} if pretrained else None
    net = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay,
                            num_classes=num_outputs, drop_rate=drop_rate)
    return STEMS[stem](net)


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
