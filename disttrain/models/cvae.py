"""CMG's conditional VAE (cmg.txt Sections 3.1, 4.3).

The class label's one-hot vector times a weight matrix is the class embedding y_c (an
`nn.Embedding`, the same product without the one-hot); the decoder draws x from [y_c, z]
(Eq. 3). The encoder q(z | x, c) sees the image's features next to y_c, and two one-layer
MLPs give the mean and log-variance of z. Two variants, as in the paper:

    resnet18  CIFAR / SVHN / TinyImageNet: a ResNet-18 encoder (3x3 stem, no max-pool, as for
              32-64 px images), a decoder of 2 residual blocks + 3 transposed convolutions
    small     MNIST: a 2-layer CNN encoder, a 2-layer transposed-convolution decoder

Pixels are in [0, 1] (a sigmoid output); the loss is Eq. 2 with a Bernoulli (binary cross-
entropy) or Gaussian (squared error) likelihood, summed over pixels, KL to N(0, I).
"""

from __future__ import annotations

from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from disttrain.models.classifier import use_small_input_stem

CVAE_VARIANTS = ("resnet18", "small")
# how much the decoder upsamples its first feature map: the image size must be a multiple
DECODER_STRIDE = {"resnet18": 8, "small": 4}


def check_cvae_shape(variant: str, image_size: int) -> str | None:
    """Why `variant` cannot make `image_size` px images, or None."""
    if variant not in CVAE_VARIANTS:
        return f"unknown CVAE variant {variant!r}; choose one of {', '.join(CVAE_VARIANTS)}"
    stride = DECODER_STRIDE[variant]
    if image_size % stride or image_size < stride:
        return (f"the {variant} CVAE's decoder upsamples by {stride}, so the image size must be a multiple of "
                f"{stride}; got {image_size}")
    return None


def _resnet18_encoder(channels: int) -> tuple[nn.Module, int]:
    net = use_small_input_stem(timm.create_model("resnet18", num_classes=0, in_chans=channels), channels)
    return net, net.num_features


def _small_encoder(channels: int) -> tuple[nn.Module, int]:
    net = nn.Sequential(
        nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 64


def _up(cin: int, cout: int, last: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
    return [conv] if last else [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CVAE(nn.Module):
    def __init__(self, num_classes: int, image_size: int, channels: int = 3,
                 variant: Literal["resnet18", "small"] = "resnet18", latent_dim: int = 128, embed_dim: int = 128):
        super().__init__()
        problem = check_cvae_shape(variant, image_size)
        if problem:
            raise ValueError(problem)
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.latent_dim, self.embed_dim, self.variant = latent_dim, embed_dim, variant
        self.class_embedding = nn.Embedding(num_classes, embed_dim)
        self.encoder, width = (_resnet18_encoder if variant == "resnet18" else _small_encoder)(channels)
        self.to_mean = nn.Linear(width + embed_dim, latent_dim)
        self.to_logvar = nn.Linear(width + embed_dim, latent_dim)
        self.base = image_size // DECODER_STRIDE[variant]
        if variant == "resnet18":
            self.width = 256
            body = [BasicBlock(256, 256), BasicBlock(256, 256), *_up(256, 128), *_up(128, 64), *_up(64, channels, True)]
        else:
            self.width = 64
            body = [*_up(64, 32), *_up(32, channels, True)]
        self.from_latent = nn.Linear(embed_dim + latent_dim, self.width * self.base * self.base)
        self.decoder = nn.Sequential(*body)

    def encode(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x, c): mean and log-variance."""
        h = torch.cat([self.encoder(images), self.class_embedding(labels)], dim=1)
        return self.to_mean(h), self.to_logvar(h)

    def decode_logits(self, embedding: Tensor, z: Tensor) -> Tensor:
        """p(x | [y, z]) as pixel logits, for any condition vector y (a class embedding or a mix of two)."""
        h = self.from_latent(torch.cat([embedding, z], dim=1)).view(-1, self.width, self.base, self.base)
        return self.decoder(F.relu(h))

    def decode(self, embedding: Tensor, z: Tensor) -> Tensor:
        """Images with pixels in [0, 1]."""
        return torch.sigmoid(self.decode_logits(embedding, z))

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction logits (reparameterised z), mean, log-variance."""
        mean, logvar = self.encode(images, labels)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decode_logits(self.class_embedding(labels), z), mean, logvar


def cvae_loss(recon_logits: Tensor, images: Tensor, mean: Tensor, logvar: Tensor,
              likelihood: Literal["bernoulli", "gaussian"] = "bernoulli") -> dict[str, Tensor]:
    """Eq. 2 per image: -log p(x | z, c) summed over pixels + KL(q(z | x, c) || N(0, I)); the
    Gaussian likelihood has unit variance (its constant dropped)."""
    recon_logits, images = recon_logits.float(), images.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(recon_logits, images, reduction="none")
    else:
        nll = 0.5 * (torch.sigmoid(recon_logits) - images).pow(2)
    nll = nll.flatten(1).sum(1).mean()
    mean, logvar = mean.float(), logvar.float()
    kl = (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)).mean()
    return {"loss": nll + kl, "reconstruction": nll, "kl": kl}
