"""Image transforms of the papers' recipes (torchvision v2)."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(image_size: int, resize_size: int, augment: str = "resize_crop", hflip: bool = True) -> v2.Compose:
    """resize_crop (mixupoe.txt App. D.1): resize to resize x resize, random crop image_size,
    horizontal flip. pad_crop (the CIFAR / SVHN recipe of cmg.txt and dmr.txt): resize to
    image_size, pad 4 px, random crop image_size, horizontal flip. `hflip=False` drops the flip
    (digits, house numbers)."""
    if augment == "pad_crop":
        crop = [v2.Resize((image_size, image_size), antialias=True), v2.RandomCrop(image_size, padding=4)]
    elif augment == "resize_crop":
        crop = [v2.Resize((resize_size, resize_size), antialias=True), v2.RandomCrop(image_size)]
    else:
        raise ValueError(f"unknown augment {augment!r}: resize_crop or pad_crop")
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose([*crop, *flip, *_to_normalized_tensor()])


def eval_transform(image_size: int, resize_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Resize to resize x resize, centre crop image_size, normalise with (mean, std) (a model
    card's normalisation; ImageNet's by default)."""
    return v2.Compose([v2.Resize((resize_size, resize_size), antialias=True), v2.CenterCrop(image_size),
                       *_to_normalized_tensor(mean, std)])


def generator_transform(image_size: int, channels: int = 3, hflip: bool = False) -> v2.Compose:
    """A generator's view of an image: resized to image_size x image_size, pixels in [0, 1] (no
    normalisation), one channel for digits; flips only where the data allow them."""
    steps = [v2.Resize((image_size, image_size), antialias=True)]
    if channels == 1:
        steps.append(v2.Grayscale(1))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
