"""Gram-matrix scorer (Sastry & Oore 2020) on the residual blocks' maps, and its block features."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from disttrain.ood.scorers.base import Features, Scorer, f64, register
from disttrain.ood.scorers.sampling import Reservoir


def gram_block_features(feature_map: Tensor, powers: int) -> Tensor:
    """Sastry & Oore (2020) Gram features of one block: [N, C, H, W] -> [N, powers, C] (float32).

    For p = 1..powers: F_p = F**p (elementwise, F as [C, H*W]), row sums of F_p F_p^T, then the
    signed p-th root. This is the official implementation's order (row sums of the Gram matrix,
    then the root: `G_p` in github.com/VectorInstitute/gram-ood-detection); the paper writes
    (F^p F^p^T)^(1/p). The row sums are computed as F_p @ (F_p^T 1), O(C*HW) instead of
    O(C^2*HW), in float64 (F**10 overflows float32 for activations above ~80)."""
    if powers < 1:
        raise ValueError(f"powers={powers} must be >= 1")
    f = feature_map.detach().to(torch.float64).flatten(2)  # [N, C, HW]
    out = []
    for p in range(1, powers + 1):
        fp = f.pow(p)
        rows = (fp * fp.sum(1, keepdim=True)).sum(2)  # [N, C]: sum_j (F_p F_p^T)[i, j]
        out.append(rows.sign() * rows.abs().pow(1.0 / p))
    return torch.stack(out, 1).float()



@register("gram")
class Gram(Scorer):
    """Sastry & Oore 2020, on the residual blocks' maps (mixupoe App. D.2).

    Features.blocks[b]: [N, powers, C_b] from `gram_block_features` (p = 1..powers; default 10,
    the original code's range(1, 11)). Fit, per PREDICTED class, per block: elementwise min and
    max over the ID fit samples. Deviation of a sample w.r.t. its predicted class:
        sum_{p,i} relu(min - v)/|min + 1e-6| + relu(v - max)/|max + 1e-6|   (official code's form),
    normalized per block by the mean deviation of held-out ID samples, summed over blocks.

    Held-out normalization (the original uses held-out ID validation data; deviations of the
    very samples that set min/max would be 0): in the single fit pass, every `holdout_every`-th
    sample (running index 0, k, 2k, ...) is a held-out candidate; a seeded reservoir keeps at
    most `holdout_size` of them apart, and every other sample (incl. candidates evicted from
    the reservoir) updates min/max. At fit_end the reservoir's mean deviation per block is the
    normalizer (a block whose held-out deviation is 0 gets normalizer 1, with a warning).
    Classes never predicted during fit use the min/max over all classes."""

    needs_fit = True
    needs_blocks = True
    block_features = "gram"
    EPS: ClassVar[float] = 1e-6

    def __init__(self, *, powers: int = 10, holdout_every: int = 10, holdout_size: int = 1000, seed: int = 0):
        if int(powers) < 1 or int(holdout_every) < 2 or int(holdout_size) < 1:
            raise ValueError(f"need powers >= 1, holdout_every >= 2, holdout_size >= 1; got "
                             f"powers={powers}, holdout_every={holdout_every}, holdout_size={holdout_size}")
        self.powers, self.holdout_every, self.holdout_size, self.seed = \
            int(powers), int(holdout_every), int(holdout_size), int(seed)
        super().__init__()

    def _reset_stats(self) -> None:
        self.mins: list[Tensor] | None = None
        self.maxs: list[Tensor] | None = None
        self._fitted_counts: Tensor | None = None
        self._seen = 0
        self._held_out = Reservoir(self.holdout_size, self.seed)  # columns: predicted class, then each block

    def reduce_block(self, feature_map: Tensor) -> Tensor:
        return gram_block_features(feature_map, self.powers)

    def _blocks(self, f: Features) -> list[Tensor]:
        for b in f.blocks:
            if b.dim() != 3 or b.shape[1] != self.powers:
                raise ValueError(f"scorer {self.name!r} (powers={self.powers}) needs blocks of shape "
                                 f"[N, {self.powers}, C] from gram_block_features(map, {self.powers}); got "
                                 f"{tuple(b.shape)}")
        return list(f.blocks)

    def _fold(self, pred: Tensor, blocks: list[Tensor]) -> None:
        for b, v in enumerate(blocks):
            v = v.float()
            index = pred.view(-1, 1, 1).expand_as(v)
            self.mins[b].scatter_reduce_(0, index, v, "amin")
            self.maxs[b].scatter_reduce_(0, index, v, "amax")
        self._fitted_counts.index_add_(0, pred, torch.ones_like(pred))

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        blocks = [b.detach() for b in self._blocks(f)]
        pred = f.logits.argmax(1).to(blocks[0].device)
        k = f.logits.shape[1]
        if self.mins is None:
            self.mins = [torch.full((k, *b.shape[1:]), math.inf, device=b.device) for b in blocks]
            self.maxs = [torch.full((k, *b.shape[1:]), -math.inf, device=b.device) for b in blocks]
            self._fitted_counts = torch.zeros(k, dtype=torch.long, device=pred.device)
        if len(blocks) != len(self.mins):
            raise ValueError(f"got {len(blocks)} blocks, earlier batches had {len(self.mins)}")
        n = len(f)
        candidate = (torch.arange(self._seen, self._seen + n, device=pred.device) % self.holdout_every) == 0
        self._seen += n
        kept, evicted = self._held_out.add(pred[candidate], *[b[candidate] for b in blocks])
        fold = ~candidate
        fold[candidate.nonzero().flatten()[~kept]] = True  # candidates that did not enter the sample
        if fold.any():
            self._fold(pred[fold], [b[fold] for b in blocks])
        if len(evicted[0]):
            self._fold(evicted[0], list(evicted[1:]))

    def _fit_end(self, pass_index: int) -> None:
        if self.mins is None or self._fitted_counts.sum() == 0:
            raise RuntimeError(f"scorer {self.name!r}: too few ID samples to fit (every "
                               f"{self.holdout_every}th is held out for normalization)")
        unseen = self._fitted_counts == 0
        for mins, maxs in zip(self.mins, self.maxs):
            mins[unseen] = mins[~unseen].amin(0)
            maxs[unseen] = maxs[~unseen].amax(0)
        self.normalizer = torch.ones(len(self.mins), dtype=torch.float64, device=self.mins[0].device)
        if len(self._held_out):
            pred, *held_out = self._held_out.columns
            for b, values in enumerate(held_out):
                self.normalizer[b] = self._deviation(b, values, pred).mean()
        zero = self.normalizer <= 0
        if zero.any():
            warnings.warn(f"scorer {self.name!r}: held-out ID samples never deviate in block(s) "
                          f"{zero.nonzero().flatten().tolist()}; using normalizer 1 there")
            self.normalizer[zero] = 1.0
        self._held_out = Reservoir(self.holdout_size, self.seed)  # free the sample

    def _deviation(self, b: int, values: Tensor, pred: Tensor) -> Tensor:
        mins = f64(self.mins[b].to(values.device)[pred])
        maxs = f64(self.maxs[b].to(values.device)[pred])
        v = f64(values)
        dev = F.relu(mins - v) / (mins + self.EPS).abs() + F.relu(v - maxs) / (maxs + self.EPS).abs()
        return dev.sum((1, 2))

    def _score(self, f: Features) -> Tensor:
        blocks = self._blocks(f)
        if len(blocks) != len(self.mins):
            raise ValueError(f"scorer {self.name!r} was fitted on {len(self.mins)} blocks, got {len(blocks)}")
        pred = f.logits.argmax(1).to(blocks[0].device)
        return sum(self._deviation(b, v, pred) / self.normalizer[b] for b, v in enumerate(blocks))


