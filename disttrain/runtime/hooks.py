"""Stateful hooks of the training loop (`TrainLoop(..., hooks={name: hook})`): run after every
optimizer step, checkpointed and restored with everything else (JSON + safetensors).

`HalfLifeEMA` is the generator average of the StyleGAN training loops (StyleGAN2-ADA,
StyleGAN-XL): its decay follows a half-life counted in images, beta = 0.5 ** (images per
step / half-life), with an optional ramp-up that caps the half-life at `rampup` x the images
seen so far (early in training the average follows the network closely).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from disttrain.runtime.loop import TrainLoop


class HalfLifeEMA:
    """An exponential moving average of `network`'s weights (buffers are copied), by half-life in
    images. `images_per_step`: the global batch. The average lives on the network's device, in
    eval mode and without gradients; `module` is what evaluation and saving use."""

    def __init__(self, network: torch.nn.Module, *, half_life_images: float, images_per_step: int,
                 rampup: float | None = None):
        if half_life_images <= 0 or images_per_step <= 0:
            raise ValueError(f"half_life_images={half_life_images} and images_per_step={images_per_step} "
                             f"must be positive")
        self.network = network
        self.half_life_images = float(half_life_images)
        self.images_per_step = int(images_per_step)
        self.rampup = rampup
        self.module = copy.deepcopy(self._unwrapped(network)).eval().requires_grad_(False)
        self.images = 0  # images the average has followed

    @staticmethod
    def _unwrapped(network: torch.nn.Module) -> torch.nn.Module:
        return getattr(network, "module", network)  # DDP keeps the network in .module

    def beta(self) -> float:
        half_life = self.half_life_images
        if self.rampup is not None:
            half_life = min(half_life, self.images * self.rampup)
        return 0.5 ** (self.images_per_step / max(half_life, 1e-8))

    @torch.no_grad()
    def after_step(self, loop: TrainLoop | None = None) -> None:
        self.images += self.images_per_step
        beta = self.beta()
        live = self._unwrapped(self.network)
        for averaged, current in zip(self.module.parameters(), live.parameters()):
            averaged.copy_(current.detach().lerp(averaged, beta))
        for averaged, current in zip(self.module.buffers(), live.buffers()):
            averaged.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = int(state["images"])
        self.module.load_state_dict(state["module"])
