"""Class-conditional Gaussian scorers: Mahalanobis (Lee et al. 2018), on the penultimate features or
per residual block."""

from __future__ import annotations

import torch
from torch import Tensor

from disttrain.ood.scorers.base import SCORE_CHUNK, Features, Scorer, f64, non_negative, pooled_block_features, register


class _SharedGaussian:
    """Streaming class-conditional Gaussians with one shared covariance (Lee et al. 2018).

    Per class: sum and count; overall: sum of outer products. Everything is shifted by the
    first batch's mean (a constant: the scatter is shift-invariant, the shift only reduces
    cancellation in sum x x^T - sum_c n_c mu_c mu_c^T), in float64.
    Covariance = within-class scatter / N (the MLE, as sklearn's EmpiricalCovariance in the
    original code); precision = pinv (hermitian)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.shift: Tensor | None = None

    def update(self, x: Tensor, labels: Tensor) -> None:
        x = f64(x.detach())
        if self.shift is None:
            d = x.shape[1]
            self.shift = x.mean(0)
            self.sums = x.new_zeros(self.num_classes, d)
            self.counts = x.new_zeros(self.num_classes)
            self.outer = x.new_zeros(d, d)
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature width changed during fit: {x.shape[1]} vs {self.shift.shape[0]}")
        xc = x - self.shift
        self.sums.index_add_(0, labels, xc)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.outer += xc.T @ xc

    def finalize(self) -> None:
        seen = self.counts > 0
        sums, counts = self.sums[seen], self.counts[seen]
        means = sums / counts[:, None]                       # shifted class means [K_seen, D]
        scatter = self.outer - sums.T @ means                 # sum x x^T - sum_c n_c mu_c mu_c^T
        cov = scatter / counts.sum()
        cov = (cov + cov.T) / 2
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        self.means = means
        self.mpm = ((means @ self.precision) * means).sum(1)  # mu_c^T P mu_c
        del self.sums, self.outer

    def class_means(self) -> Tensor:
        return self.means + self.shift

    def min_distance(self, x: Tensor) -> Tensor:
        """min_c (x - mu_c)^T P (x - mu_c), without the [N, K, D] difference tensor."""
        xc = f64(x) - self.shift.to(x.device)
        xp = xc @ self.precision.to(x.device)
        d = (xp * xc).sum(1, keepdim=True) - 2 * xp @ self.means.to(x.device).T + self.mpm.to(x.device)
        return d.amin(1)


@register("mahalanobis")
class Mahalanobis(Scorer):
    """Lee et al. 2018: class-conditional Gaussians (TRUE labels of the ID fit data) with a shared
    covariance; score = min over classes of the squared Mahalanobis distance.

    use_blocks=False: on the penultimate features. use_blocks=True: on each residual block's
    global-average-pooled map (Features.blocks, block_features="pooled"), score = SUM over blocks
    of the per-block minimal distances (mixupoe App. D.2 following Hsu et al. 2020: plain sum, no
    learned weights). The penultimate features are then not added: for a ResNet they are the
    pooled last block, which would count it twice. epsilon > 0: input preprocessing (`perturb`)."""

    needs_fit = True
    score_chunk = SCORE_CHUNK
    needs_labels = True

    def __init__(self, *, use_blocks: bool = False, epsilon: float = 0.0):
        self.use_blocks = bool(use_blocks)
        self.epsilon = non_negative("epsilon", epsilon)
        self.needs_input_grad = self.epsilon > 0
        self.needs_blocks = self.use_blocks
        self.needs_penultimate = not self.use_blocks
        self.block_features = "pooled" if self.use_blocks else None
        super().__init__()

    def _inputs(self, f: Features) -> list[Tensor]:
        return [pooled_block_features(b) for b in f.blocks] if self.use_blocks else [f.penultimate]

    def _reset_stats(self) -> None:
        self.gaussians: list[_SharedGaussian] | None = None

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        inputs = self._inputs(f)
        k = f.logits.shape[1]
        labels = f.labels.to(torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"scorer {self.name!r}: labels must lie in [0, {k}) (the logits' width)")
        if self.gaussians is None:
            self.gaussians = [_SharedGaussian(k) for _ in inputs]
        if len(inputs) != len(self.gaussians):
            raise ValueError(f"got {len(inputs)} blocks, earlier batches had {len(self.gaussians)}")
        for g, x in zip(self.gaussians, inputs):
            g.update(x, labels.to(x.device))

    def _fit_end(self, pass_index: int) -> None:
        if self.gaussians is None or self.gaussians[0].counts.sum() == 0:
            raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
        for g in self.gaussians:
            g.finalize()

    def _score(self, f: Features) -> Tensor:
        inputs = self._inputs(f)
        if len(inputs) != len(self.gaussians):
            raise ValueError(f"scorer {self.name!r} was fitted on {len(self.gaussians)} blocks, got {len(inputs)}")
        return sum(g.min_distance(x) for g, x in zip(self.gaussians, inputs))


