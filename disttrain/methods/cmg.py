"""CMG (cmg.txt): class-mixed pseudo-OOD generation and the stage-2 losses.

    mixed_conditions   Eq. 4's abnormal condition k * y_ci + (1 - k) * y_cj, k ~ Bernoulli(0.5)
                       per component, c_i != c_j
    sample_latents     z ~ N(0, sigma^2 I), optionally every component outside [-t, t] (Fig. 3b/c)
    energy_margins     m_ind / m_ood so that a fraction (80 %) of ID / pseudo-OOD energies cost (4.3)
    STAGE2_LOSSES      cmg_softmax (an (N+1)-th class) and cmg_energy (CE + lambda * Eq. 5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from disttrain.methods.outlier_exposure import energy, energy_margin_loss


@dataclass
class MixedConditions:
    embeddings: Tensor  # [n, embed_dim]
    class_i: Tensor  # [n]
    class_j: Tensor  # [n], never equal to class_i
    mask: Tensor  # [n, embed_dim] k: 1 takes y_ci's component, 0 y_cj's


def mixed_conditions(class_embedding: Tensor, count: int, generator: torch.Generator) -> MixedConditions:
    """Eq. 4's pseudo class embeddings from the CVAE's [num_classes, embed_dim] embedding table.

    c_i is uniform over the classes and c_j uniform over the others (the paper mixes two
    different classes; a pair i == i would only be that class's own embedding)."""
    num_classes, dim = class_embedding.shape
    if num_classes < 2:
        raise ValueError(f"class mixing needs at least 2 classes, the CVAE has {num_classes}")
    device = class_embedding.device
    class_i = torch.randint(num_classes, (count,), generator=generator, device=device)
    class_j = (class_i + torch.randint(1, num_classes, (count,), generator=generator, device=device)) % num_classes
    mask = torch.bernoulli(torch.full((count, dim), 0.5, device=device), generator=generator)
    mixed = mask * class_embedding[class_i] + (1 - mask) * class_embedding[class_j]
    return MixedConditions(mixed, class_i, class_j, mask)


def sample_latents(count: int, dim: int, sigma: float, generator: torch.Generator, filter_t: float = 0.0,
                   device: torch.device | str = "cpu") -> Tensor:
    """z ~ N(0, sigma^2 I); with filter_t > 0 each component is drawn from N(0, sigma^2) restricted
    to |z| > t (the paper filters out values in [-t, t]; rejecting whole vectors would reject
    almost all of them in 128 dimensions, so each component is redrawn instead, by inverting
    the normal CDF on its kept tail)."""
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    if filter_t <= 0:
        return sigma * torch.randn(count, dim, generator=generator, device=device)
    normal = torch.distributions.Normal(0.0, 1.0)
    tail = float(normal.cdf(torch.tensor(filter_t / sigma)))  # P(z / sigma <= t / sigma)
    u = tail + (1 - tail) * torch.rand(count, dim, generator=generator, device=device)
    u = u.clamp(max=1 - 1e-7)  # ndtri(1) is inf
    sign = torch.where(torch.rand(count, dim, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return sign * sigma * torch.special.ndtri(u)


def energy_margins(energy_id: Tensor, energy_ood: Tensor, fraction: float = 0.8) -> tuple[float, float]:
    """(m_ind, m_ood): `fraction` of the ID energies lie above m_ind and `fraction` of the pseudo-OOD
    energies below m_ood, so that share of each gets a non-zero Eq. 5 loss (cmg.txt 4.3)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1)")
    if energy_id.numel() == 0 or energy_ood.numel() == 0:
        raise ValueError("energy margins need at least one ID and one pseudo-OOD energy")
    m_ind = torch.quantile(energy_id.double().flatten(), 1.0 - fraction).item()
    m_ood = torch.quantile(energy_ood.double().flatten(), fraction).item()
    return m_ind, m_ood


class CMGSoftmax:
    """An (N+1)-th logit for pseudo-OOD data, cross-entropy over N+1 classes; score: its softmax."""

    name, score, extra_outputs = "cmg_softmax", "ood_class", 1

    def __call__(self, logits_id: Tensor, labels: Tensor, logits_ood: Tensor | None) -> dict[str, Tensor]:
        if logits_ood is None:
            raise ValueError("cmg_softmax learns its OOD class from pseudo-OOD data: it cannot train without them")
        num_id = logits_id.shape[1] - 1
        ood_labels = torch.full((logits_ood.shape[0],), num_id, dtype=labels.dtype, device=labels.device)
        loss = F.cross_entropy(torch.cat([logits_id, logits_ood]).float(), torch.cat([labels, ood_labels]))
        acc = (logits_id[:, :num_id].argmax(1) == labels).float().mean()
        return {"loss": loss, "acc1": acc}


class CMGEnergy:
    """CE on the ID data + weight * Eq. 5 (the ID hinge only when no pseudo-OOD data are given,
    Fig. 2b's "stage 2 without pseudo-OOD data"); score: the energy of Eq. 6."""

    name, score, extra_outputs = "cmg_energy", "energy", 0

    def __init__(self, m_ind: float, m_ood: float, weight: float = 0.1, temperature: float = 1.0):
        self.m_ind, self.m_ood, self.weight, self.temperature = m_ind, m_ood, weight, temperature

    def __call__(self, logits_id: Tensor, labels: Tensor, logits_ood: Tensor | None) -> dict[str, Tensor]:
        ce = F.cross_entropy(logits_id.float(), labels)
        e_id = energy(logits_id, self.temperature)
        if logits_ood is None:
            margin = F.relu(e_id - self.m_ind).pow(2).mean()
        else:
            margin = energy_margin_loss(e_id, energy(logits_ood, self.temperature), self.m_ind, self.m_ood)
        return {"loss": ce + self.weight * margin, "ce": ce, "energy_margin": margin,
                "acc1": (logits_id.argmax(1) == labels).float().mean()}


STAGE2_LOSSES = {"cmg_softmax": CMGSoftmax, "cmg_energy": CMGEnergy}
