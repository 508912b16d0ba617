"""A small class-conditional GAN (a DCGAN-style generator and a projection discriminator,
Miyato & Koyama 2018) for what is measured or tested about training several networks at
once: the two-network step of `recipes/benchmark.py` and the phases test (tests/gan_stage.py).
Not a method of the papers: their generators (StyleGAN-XL, the CVAE, MoodCat's) live beside it."""

from __future__ import annotations

import torch
from torch import nn

LATENT = 32


class SmallGenerator(nn.Module):
    """z (LATENT) and a class -> an image of `size` px (a multiple of 4), about the range of
    ImageNet-normalised pixels."""

    def __init__(self, num_classes: int, size: int, width: int = 64):
        super().__init__()
        if size % 4:
            raise ValueError(f"size={size} must be a multiple of 4")
        self.base, self.width = size // 4, width
        self.embed = nn.Embedding(num_classes, LATENT)
        self.fc = nn.Linear(2 * LATENT, width * self.base * self.base)
        self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
                                  nn.Upsample(scale_factor=2), nn.Conv2d(width // 2, 3, 3, padding=1))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(labels)], 1)).view(-1, self.width, self.base, self.base)
        return torch.tanh(self.body(h)) * 2.5


class SmallDiscriminator(nn.Module):
    """Projection discriminator: linear(h) + <embed(c), h> over pooled convolutional features."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes, width)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(images)
        return self.out(h).squeeze(1) + (self.embed(labels) * h).sum(1)
