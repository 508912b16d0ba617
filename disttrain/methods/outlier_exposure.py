"""Outlier-exposure objectives of mixupoe.txt Section 4: OE (Eq. 1), Energy-OE, MixupOE (Eqs. 2, 3).

Each objective is called with the model, a micro-batch of ID images and labels, a micro-batch
of outliers and a numpy Generator (the mixing coefficients and pairings come from it, so a
step is reproducible from its seed), and returns {"loss": scalar, **terms}. Every input the
objective needs goes through ONE forward pass (ID, mixed and outlier images concatenated), so
BatchNorm normalises them together, as in the papers' code.

Targets: CE to a distribution `t` is -sum_k t_k log p_k; the uniform distribution over the K
ID classes is `U`; a mixed sample lam * x_id + (1 - lam) * x' gets the soft target
lam * onehot(y) + (1 - lam) * t(x'), with lam ~ Beta(alpha, alpha).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("id", "id_id", "id_ood", "ood")  # the four terms of Eq. 2


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k."""
    return -(target * logits.float().log_softmax(1)).sum(1).mean()


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """CE to the uniform distribution over the classes: -mean_k log softmax(logits)_k, batch mean."""
    return -logits.float().log_softmax(1).mean(1).mean()


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy E(x) = -T logsumexp(f(x) / T); lower on ID data."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def energy_margin_loss(energy_id: Tensor, energy_ood: Tensor, m_in: float, m_out: float) -> Tensor:
    """Liu et al.'s squared hinges: ID energies above m_in and outlier energies below m_out cost."""
    return F.relu(energy_id - m_in).pow(2).mean() + F.relu(m_out - energy_ood).pow(2).mean()


def mixing_lambda(rng: np.random.Generator, alpha: float, size: int | None = None, coarse: bool = False) -> np.ndarray:
    """lam ~ Beta(alpha, alpha), one value (size=None) or `size`; with `coarse`, min(lam, 1 - lam)
    (mixupoe.txt App. H.2: the interpolation always weights the outlier more)."""
    lam = np.asarray(rng.beta(alpha, alpha, size=size), dtype=np.float64)
    return np.minimum(lam, 1.0 - lam) if coarse else lam


def _mix(lam: np.ndarray, a: Tensor, b: Tensor) -> Tensor:
    """lam * a + (1 - lam) * b with lam a scalar or one value per row; computed in float32 (or
    float64) and returned in a's dtype, so bf16 inputs mix with the same lam as their targets."""
    compute = torch.promote_types(a.dtype, torch.float32)
    weight = torch.as_tensor(lam, dtype=compute, device=a.device)
    if weight.dim():
        weight = weight.view(-1, *([1] * (a.dim() - 1)))
    return (weight * a.to(compute) + (1 - weight) * b.to(compute)).to(a.dtype)


def _forward(model: Callable[[Tensor], Tensor], parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """One forward over the concatenation of `parts`; the logits split back by part."""
    logits = model(torch.cat(list(parts.values())))
    return dict(zip(parts, logits.split([len(p) for p in parts.values()])))


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(1) == labels).float().mean()


class Objective:
    """Base: `score` is the post-hoc scorer the method is evaluated with (mixupoe.txt Section 4)."""

    name: ClassVar[str]
    score: ClassVar[str] = "msp"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, model: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, outliers: Tensor,
                 rng: np.random.Generator) -> dict[str, Tensor]:
        raise NotImplementedError


class OE(Objective):
    """Eq. 1: CE(f(x), y) + beta * CE(f(x'), U)."""

    name = "oe"

    def __init__(self, num_classes: int, beta: float = 5.0):
        super().__init__(num_classes)
        self.beta = beta

    def __call__(self, model, images, labels, outliers, rng):
        logits = _forward(model, {"id": images, "ood": outliers})
        id_loss = F.cross_entropy(logits["id"].float(), labels)
        ood_loss = uniform_cross_entropy(logits["ood"])
        return {"loss": id_loss + self.beta * ood_loss, "loss_id": id_loss, "loss_ood": ood_loss,
                "acc1": _accuracy(logits["id"], labels)}


class EnergyOE(Objective):
    """CE(f(x), y) + weight * (relu(E(x) - m_in)^2 + relu(m_out - E(x'))^2); scored by energy."""

    name = "energy_oe"
    score = "energy"

    def __init__(self, num_classes: int, m_in: float = -15.0, m_out: float = -5.0, weight: float = 0.1,
                 temperature: float = 1.0):
        super().__init__(num_classes)
        self.m_in, self.m_out, self.weight, self.temperature = m_in, m_out, weight, temperature

    def __call__(self, model, images, labels, outliers, rng):
        logits = _forward(model, {"id": images, "ood": outliers})
        id_loss = F.cross_entropy(logits["id"].float(), labels)
        e_id, e_ood = energy(logits["id"], self.temperature), energy(logits["ood"], self.temperature)
        margin = energy_margin_loss(e_id, e_ood, self.m_in, self.m_out)
        return {"loss": id_loss + self.weight * margin, "loss_id": id_loss, "loss_energy": margin,
                "energy_id": e_id.mean().detach(), "energy_ood": e_ood.mean().detach(),
                "acc1": _accuracy(logits["id"], labels)}


class MixupOE(Objective):
    """Eq. 2 with each term switchable; the default terms (id, id_ood) are Eq. 3.

    id      CE(f(x), y)
    id_id   beta_id_id  * CE(f(lam x_i + (1-lam) x_j), lam y_i + (1-lam) y_j),  lam ~ Beta(alpha_id_id)
    id_ood  beta_id_ood * CE(f(lam x + (1-lam) x'), lam y + (1-lam) U),        lam ~ Beta(alpha_id_ood)
    ood     beta_ood    * CE(f(x'), U)

    ID sample i is mixed with outlier i (modulo the outlier batch); `lambda_per` draws one lam
    per batch (mixup's usual) or one per sample; `coarse` takes min(lam, 1 - lam) for ID-OOD.
    """

    name = "mixup_oe"

    def __init__(self, num_classes: int, terms: tuple[str, ...] | list[str] = ("id", "id_ood"),
                 alpha_id_ood: float = 1.0, beta_id_ood: float = 5.0, alpha_id_id: float = 1.0,
                 beta_id_id: float = 1.0, beta_ood: float = 5.0, coarse: bool = False, lambda_per: str = "batch"):
        super().__init__(num_classes)
        unknown = set(terms) - set(TERMS)
        if unknown or not terms:
            raise ValueError(f"MixupOE terms {list(terms)}: expected a non-empty subset of {', '.join(TERMS)}")
        if lambda_per not in ("batch", "sample"):
            raise ValueError(f"lambda_per={lambda_per!r}: expected 'batch' or 'sample'")
        self.terms = tuple(t for t in TERMS if t in terms)
        self.weights = {"id": 1.0, "id_id": beta_id_id, "id_ood": beta_id_ood, "ood": beta_ood}
        self.alpha_id_ood, self.alpha_id_id = alpha_id_ood, alpha_id_id
        self.coarse, self.lambda_per = coarse, lambda_per

    def _lambda(self, rng: np.random.Generator, alpha: float, n: int, coarse: bool = False) -> np.ndarray:
        return mixing_lambda(rng, alpha, n if self.lambda_per == "sample" else None, coarse)

    def __call__(self, model, images, labels, outliers, rng):
        n = len(images)
        onehot = F.one_hot(labels, self.num_classes).float()
        uniform = torch.full_like(onehot, 1.0 / self.num_classes)
        parts: dict[str, Tensor] = {}
        targets: dict[str, Tensor] = {}
        if "id" in self.terms:
            parts["id"], targets["id"] = images, onehot
        if "id_id" in self.terms:
            lam = self._lambda(rng, self.alpha_id_id, n)
            partner = torch.as_tensor(rng.permutation(n), device=images.device)
            parts["id_id"] = _mix(lam, images, images[partner])
            targets["id_id"] = _mix(lam, onehot, onehot[partner])
        if "id_ood" in self.terms:
            lam = self._lambda(rng, self.alpha_id_ood, n, self.coarse)
            paired = outliers[torch.arange(n, device=outliers.device) % len(outliers)]
            parts["id_ood"] = _mix(lam, images, paired)
            targets["id_ood"] = _mix(lam, onehot, uniform)
        if "ood" in self.terms:
            parts["ood"] = outliers
            targets["ood"] = torch.full((len(outliers), self.num_classes), 1.0 / self.num_classes,
                                        device=outliers.device)
        logits = _forward(model, parts)
        losses = {term: soft_cross_entropy(logits[term], targets[term]) for term in self.terms}
        out: dict[str, Tensor] = {"loss": sum(self.weights[t] * losses[t] for t in self.terms)}
        out.update({f"loss_{term}": value for term, value in losses.items()})
        if "id" in logits:
            out["acc1"] = _accuracy(logits["id"], labels)
        return out


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (OE, EnergyOE, MixupOE)}


def build_objective(name: str, num_classes: int, **params: Any) -> Objective:
    """The objective registered as `name` with its hyper-parameters; unknown names list the known."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown outlier-exposure method {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](num_classes, **params)
