"""The outlier-exposure objectives against values worked out by hand (mixupoe.txt Eqs. 1-3, Energy-OE).

The "model" is the identity, so the images are the logits: mixing images mixes logits, and every
loss below is a closed form of a few exponentials.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disttrain.methods.outlier_exposure import (OBJECTIVES, build_objective, energy, energy_margin_loss,
                                                mixing_lambda, soft_cross_entropy, uniform_cross_entropy)


class CountingIdentity(torch.nn.Module):
    """Returns its input; records the batch sizes it was called with."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(len(x))
        return x


class FixedDraws:
    """A stand-in for np.random.Generator with chosen lambda and permutation."""

    def __init__(self, lam, permutation=None):
        self.lam, self.perm = lam, permutation

    def beta(self, a, b, size=None):
        return np.full(size, self.lam) if size is not None else self.lam

    def permutation(self, n):
        return np.asarray(self.perm if self.perm is not None else range(n))


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


CE_ID = math.log(1 + math.exp(-2))  # CE of logits [2, 0] for label 0 = 0.126928
CE_UNIFORM = (math.log(3) + math.log(1.5)) / 2  # CE of logits [0, ln 2] to uniform = 0.752039


def test_cross_entropy_building_blocks():
    assert uniform_cross_entropy(t([[0.0, math.log(2)]])).item() == pytest.approx(CE_UNIFORM, abs=1e-6)
    assert soft_cross_entropy(t([[2.0, 0.0]]), t([[1.0, 0.0]])).item() == pytest.approx(CE_ID, abs=1e-6)
    # a uniform soft target is the uniform CE
    logits = torch.randn(5, 7)
    assert soft_cross_entropy(logits, torch.full((5, 7), 1 / 7)).item() == pytest.approx(
        uniform_cross_entropy(logits).item(), abs=1e-6)
    assert energy(t([[0.0, 0.0]])).item() == pytest.approx(-math.log(2))
    assert energy(t([[0.0, 0.0]]), temperature=2.0).item() == pytest.approx(-2 * math.log(2))


def test_energy_margins_by_hand():
    e_in, e_out = t([-math.log(2), -20.0]), t([-math.log(6), 3.0])
    # ID: relu(-0.693 + 1)^2 and relu(-20 + 1)^2 = 0; outliers: relu(0 + 1.792)^2 and relu(0 - 3)^2 = 0
    expected = (1 - math.log(2)) ** 2 / 2 + math.log(6) ** 2 / 2
    assert energy_margin_loss(e_in, e_out, m_in=-1.0, m_out=0.0).item() == pytest.approx(expected, abs=1e-9)


def test_oe_eq1_by_hand_in_one_forward():
    model = CountingIdentity()
    out = build_objective("oe", 2, beta=5.0)(model, t([[2.0, 0.0]]), torch.tensor([0]), t([[0.0, math.log(2)]]),
                                             FixedDraws(0.5))
    assert out["loss_id"].item() == pytest.approx(CE_ID, abs=1e-6)
    assert out["loss_ood"].item() == pytest.approx(CE_UNIFORM, abs=1e-6)
    assert out["loss"].item() == pytest.approx(CE_ID + 5 * CE_UNIFORM, abs=1e-6)  # 3.887128
    assert model.calls == [2]  # ID and outliers together: BatchNorm sees both


def test_energy_oe_by_hand():
    objective = build_objective("energy_oe", 2, m_in=-1.0, m_out=0.0, weight=0.1)
    out = objective(CountingIdentity(), t([[0.0, 0.0]]), torch.tensor([0]), t([[math.log(3), math.log(3)]]),
                    FixedDraws(0.5))
    margin = (1 - math.log(2)) ** 2 + math.log(6) ** 2  # 0.094187 + 3.210402
    assert out["loss_energy"].item() == pytest.approx(margin, abs=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(2) + 0.1 * margin, abs=1e-6)
    assert objective.score == "energy" and OBJECTIVES["oe"].score == "msp" and OBJECTIVES["mixup_oe"].score == "msp"


def test_mixup_oe_eq3_soft_target_by_hand():
    # lam = 0.25: mixed logits 0.25 [2, 0] + 0.75 [0, 0] = [0.5, 0];
    # target 0.25 [1, 0] + 0.75 [0.5, 0.5] = [0.625, 0.375]
    z = math.log(1 + math.exp(0.5))
    mixed_ce = 0.625 * (z - 0.5) + 0.375 * z  # 0.661577
    model = CountingIdentity()
    out = build_objective("mixup_oe", 2, beta_id_ood=5.0)(model, t([[2.0, 0.0]]), torch.tensor([0]), t([[0.0, 0.0]]),
                                                           FixedDraws(0.25))
    assert out["loss_id_ood"].item() == pytest.approx(mixed_ce, abs=1e-6)
    assert out["loss"].item() == pytest.approx(CE_ID + 5 * mixed_ce, abs=1e-6)  # 3.434813
    assert model.calls == [2] and set(out) == {"loss", "loss_id", "loss_id_ood", "acc1"}


def test_coarse_variant_weights_the_outlier_more():
    """App. H.2: lam' = min(lam, 1 - lam), so a draw of 0.75 mixes like 0.25."""
    args = (t([[2.0, 0.0]]), torch.tensor([0]), t([[0.0, 0.0]]))
    coarse = build_objective("mixup_oe", 2, coarse=True)(CountingIdentity(), *args, FixedDraws(0.75))
    fine = build_objective("mixup_oe", 2)(CountingIdentity(), *args, FixedDraws(0.25))
    plain = build_objective("mixup_oe", 2)(CountingIdentity(), *args, FixedDraws(0.75))
    assert coarse["loss"].item() == pytest.approx(fine["loss"].item(), abs=1e-9)
    assert plain["loss"].item() != pytest.approx(fine["loss"].item(), abs=1e-3)
    rng = np.random.default_rng(0)
    assert (mixing_lambda(rng, 0.4, size=1000, coarse=True) <= 0.5).all()


def test_four_term_switchboard():
    images, labels = t([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    outliers = t([[0.0, math.log(2)], [0.0, math.log(2)]])
    weights = dict(beta_id_id=2.0, beta_id_ood=3.0, beta_ood=4.0)

    def run(terms, lam=0.5, perm=(1, 0)):
        model = CountingIdentity()
        out = build_objective("mixup_oe", 2, terms=terms, **weights)(model, images, labels, outliers,
                                                                      FixedDraws(lam, perm))
        return out, model.calls

    # ID-ID with partners swapped at lam 0.5: both mixed logits are [1, 1], both targets [0.5, 0.5] -> ln 2
    out, calls = run(["id_id"])
    assert out["loss"].item() == pytest.approx(2.0 * math.log(2), abs=1e-6) and calls == [2]
    assert "acc1" not in out  # no plain ID term, no ID accuracy
    # ID + OOD is OE with beta = beta_ood
    out, _ = run(["id", "ood"])
    oe = build_objective("oe", 2, beta=4.0)(CountingIdentity(), images, labels, outliers, FixedDraws(0.5))
    assert out["loss"].item() == pytest.approx(oe["loss"].item(), abs=1e-9)
    # all four: one forward over ID + ID-ID + ID-OOD + OOD, the loss the weighted sum of the terms
    out, calls = run(["id", "id_id", "id_ood", "ood"])
    assert calls == [8]
    total = out["loss_id"] + 2.0 * out["loss_id_id"] + 3.0 * out["loss_id_ood"] + 4.0 * out["loss_ood"]
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-9)
    assert out["loss_ood"].item() == pytest.approx(CE_UNIFORM, abs=1e-6)
    # each term alone equals its share of the full objective
    for term, weight in (("id", 1.0), ("id_id", 2.0), ("id_ood", 3.0), ("ood", 4.0)):
        alone, _ = run([term])
        assert alone["loss"].item() == pytest.approx(weight * out[f"loss_{term}"].item(), abs=1e-9)


def test_per_sample_lambda_and_gradients_flow():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4))
    images, labels, outliers = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,)), torch.randn(3, 3, 2, 2)
    objective = build_objective("mixup_oe", 4, terms=["id", "id_id", "id_ood", "ood"], lambda_per="sample")
    out = objective(net, images, labels, outliers, np.random.default_rng(1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and net[1].weight.grad.abs().sum() > 0
    # the same seed gives the same loss: a resumed step draws the same lambdas and partners
    again = objective(net, images, labels, outliers, np.random.default_rng(1))
    assert again["loss"].item() == out["loss"].item()


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match="oe, energy_oe, mixup_oe"):
        build_objective("mixoe", 10)
    with pytest.raises(ValueError, match="id, id_id, id_ood, ood"):
        build_objective("mixup_oe", 10, terms=["id", "in_out"])
