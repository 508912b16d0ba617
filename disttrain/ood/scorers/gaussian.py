"""Class-conditional Gaussian scorers: Mahalanobis (Lee et al. 2018), on the penultimate features or
per residual block."""

from __future__ import annotations

import torch
from torch import Tensor

from disttrain.ood.scorers.base import Features, Scorer, non_negative, pooled_block_features, register
from disttrain.ood.scorers.moments import GroupedMoments, Whitening, compute_dtype, products_dtype


class _SharedGaussian:
    """Streaming class-conditional Gaussians with one shared covariance (Lee et al. 2018).

    Covariance = within-class scatter / N (the MLE, as sklearn's EmpiricalCovariance in the
    original code), accumulated by `GroupedMoments` (float32 products of class-centred rows,
    float64 accumulation); precision = pinv, applied as a whitening (`Whitening`: a Cholesky
    triangular solve per scored batch). Distances: with y = w(x - r) and nu_c = w(mu_c - r) for a
    reference point r (the mean of the class means), (x - mu_c)^T P (x - mu_c) = ||y - nu_c||^2."""

    def __init__(self, num_classes: int, products: torch.dtype):
        self.moments = GroupedMoments(num_classes, products)
        self.products = products

    @property
    def counts(self) -> Tensor:
        return self.moments.counts

    def update(self, x: Tensor, labels: Tensor) -> None:
        self.moments.update(x, labels)

    def finalize(self) -> None:
        moments = self.moments
        moments.finish()
        seen = moments.counts > 0
        self.means = moments.means()[seen]  # [K_seen, D] float64
        self.whitening = Whitening(moments.scatter() / moments.total)
        self.reference = self.means.mean(0).to(moments.shifts.dtype)  # r, exactly representable in the rows' dtype
        self.whitened_means = torch.cat(self.whitening(self.means - self.reference.to(torch.float64)), 1)  # nu_c
        del self.moments

    def class_means(self) -> Tensor:
        return self.means

    def min_distance(self, x: Tensor) -> Tensor:
        """min_c (x - mu_c)^T P (x - mu_c) = min_c ||y - nu_c||^2, without an [N, K, D] tensor: the
        nearest class from -2 y.nu_c + ||nu_c||^2 (cheap, [N, K]), then ||y - nu_c||^2 to it as a sum of
        squares (no cancellation; a near-tie that picks the other class changes the distance by less
        than the rounding of the two)."""
        dtype = compute_dtype(x, self.products)
        y = self.whitening(x.to(dtype) - self.reference.to(x.device, dtype))  # column blocks of y
        nu = self.whitened_means.to(x.device, dtype)
        blocks = [nu[:, cols] for cols in self.whitening.columns()]
        cross = sum(y_b @ nu_b.T for y_b, nu_b in zip(y, blocks))
        nearest = (cross.mul_(-2) + (nu * nu).sum(1)).argmin(1)
        distance = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for y_b, nu_b in zip(y, blocks):
            diff = y_b - nu_b.index_select(0, nearest)  # [n, 256]: differentiable (input preprocessing)
            distance = distance + torch.linalg.vecdot(diff, diff).to(torch.float64)
        return distance


@register("mahalanobis")
class Mahalanobis(Scorer):
    """Lee et al. 2018: class-conditional Gaussians (TRUE labels of the ID fit data) with a shared
    covariance; score = min over classes of the squared Mahalanobis distance.

    use_blocks=False: on the penultimate features. use_blocks=True: on each residual block's
    global-average-pooled map (Features.blocks, block_features="pooled"), score = SUM over blocks
    of the per-block minimal distances (mixupoe App. D.2 following Hsu et al. 2020: plain sum, no
    learned weights). The penultimate features are then not added: for a ResNet they are the
    pooled last block, which would count it twice. epsilon > 0: input preprocessing (`perturb`).

    products: the precision of the fit's and the scoring's matrix products ("float32", the default:
    float64 accumulation of float32 GEMMs, see moments.py; "float64": all float64, about twice the
    time, for features whose covariance is so ill-conditioned that float32 rounding matters)."""

    needs_fit = True
    needs_labels = True

    def __init__(self, *, use_blocks: bool = False, epsilon: float = 0.0, products: str = "float32"):
        self.use_blocks = bool(use_blocks)
        self.products = products
        self._products = products_dtype(products)
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
            self.gaussians = [_SharedGaussian(k, self._products) for _ in inputs]
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


