"""Activation-shaping scorer: ReAct (Sun et al. 2021), the energy of logits recomputed from clipped
penultimate activations."""

from __future__ import annotations

import torch
from torch import Tensor

from disttrain.ood.scorers.base import ClassifierScorer, Features, native, register
from disttrain.ood.scorers.sampling import Reservoir, linear_percentile


@register("react")
class ReAct(ClassifierScorer):
    """Sun et al. 2021: clip the penultimate activations at c = the `percentile`-th percentile of
    ALL ID fit activation values (h -> min(h, c)), recompute logits = W clip(h) + b, score =
    energy (T=1) of those logits: -logsumexp(W min(h, c) + b).

    The percentile comes from a seeded uniform reservoir sample of `reservoir_size` activation
    values (bottom-k sampling; exact while the fit data has at most that many values;
    rank error ~ sqrt(q(1-q)/size) ~ 3e-4 at the defaults); numpy's linear interpolation."""

    needs_fit = True

    def __init__(self, *, percentile: float = 90.0, reservoir_size: int = 1_000_000, seed: int = 0,
                 weight: Tensor | None = None, bias: Tensor | None = None):
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile={percentile} must be in [0, 100]")
        if int(reservoir_size) < 1:
            raise ValueError(f"reservoir_size={reservoir_size} must be >= 1")
        self.percentile, self.reservoir_size, self.seed = float(percentile), int(reservoir_size), int(seed)
        super().__init__(weight=weight, bias=bias)

    def _reset_stats(self) -> None:
        self._sample = Reservoir(self.reservoir_size, self.seed)

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        self._sample.add(f.penultimate.detach().reshape(-1), report=False)  # one row per activation value

    def _fit_end(self, pass_index: int) -> None:
        if not len(self._sample):
            raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
        self.threshold = linear_percentile(self._sample.columns[0], self.percentile)
        self._sample = Reservoir(self.reservoir_size, self.seed)  # free the sample

    def _score(self, f: Features) -> Tensor:
        h = native(f.penultimate).clamp(max=self.threshold)
        w, b = self.weight.to(h), self.bias.to(h)
        return -torch.logsumexp(h @ w.T + b, 1)

