"""Subspace scorer: ViM (Wang et al. 2022), the residual off the ID features' principal subspace."""

from __future__ import annotations

import torch
from torch import Tensor

from disttrain.ood.scorers.base import SCORE_CHUNK, ClassifierScorer, Features, f64, register


def vim_default_dim(width: int) -> int:
    """ViM's principal-subspace dimension, as in the official code."""
    return 1000 if width >= 2048 else 512 if width >= 768 else width // 2


@register("vim")
class ViM(ClassifierScorer):
    """Wang et al. 2022 (official code github.com/haoqiwang/vim): origin u = -pinv(W) b; principal
    subspace P = top-`dim` eigenvectors of the (uncentred at u) covariance of x - u on the ID fit
    data; residual norm r(x) = ||(x - u) projected on P-perp||; alpha = mean max-logit / mean r
    over the ID fit data. ViM score = logsumexp(logits) - alpha*r; ours (higher = OOD):
        alpha * r(x) - logsumexp(logits).
    dim=None: 1000 if D >= 2048, 512 if D >= 768, else D // 2.

    Two fit passes (fit_passes=2): pass 1 accumulates sum (x-u)(x-u)^T and the max-logit sum
    (float64); its fit_end computes the subspace; pass 2 accumulates the residual norms; its
    fit_end sets alpha. `fit(data)` runs both (data must be re-iterable or a callable)."""

    needs_fit = True
    score_chunk = SCORE_CHUNK
    fit_passes = 2

    def __init__(self, *, dim: int | None = None, weight: Tensor | None = None, bias: Tensor | None = None):
        if dim is not None and int(dim) < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        self.dim = None if dim is None else int(dim)
        super().__init__(weight=weight, bias=bias)

    def _classifier_set(self) -> None:
        self.origin = -(torch.linalg.pinv(self.weight) @ self.bias)  # u = -pinv(W) b

    def _reset_stats(self) -> None:
        self._outer: Tensor | None = None
        self._n = 0
        self._maxlogit_sum = 0.0
        self._residual_sum = 0.0
        self._n2 = 0

    def _centred(self, f: Features) -> Tensor:
        return f64(f.penultimate) - self.origin.to(f.penultimate.device)

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        x = self._centred(f)
        if pass_index == 0:
            if self._outer is None:
                self._outer = x.new_zeros(x.shape[1], x.shape[1])
            self._outer += x.T @ x
            self._n += len(f)
            self._maxlogit_sum += float(f64(f.logits).amax(1).sum())
        else:
            self._residual_sum += float(self._residual(x).sum())
            self._n2 += len(f)

    def _fit_end(self, pass_index: int) -> None:
        if pass_index == 0:
            if self._n == 0:
                raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
            width = self._outer.shape[0]
            dim = vim_default_dim(width) if self.dim is None else self.dim
            if not 0 < dim < width:
                raise ValueError(f"scorer {self.name!r}: dim={dim} must be in [1, {width - 1}] for {width}-d features")
            self.principal_dim = dim
            cov = self._outer / self._n
            eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
            order = eigvals.argsort(descending=True)
            self.null_space = eigvecs[:, order[dim:]].contiguous()  # [D, D - dim]
            self._outer = None
        else:
            if self._n2 == 0:
                raise RuntimeError(f"scorer {self.name!r}: no ID samples seen in the second fit pass")
            mean_residual = self._residual_sum / self._n2
            self.alpha = (self._maxlogit_sum / self._n) / mean_residual if mean_residual > 0 else 0.0

    def _residual(self, centred: Tensor) -> Tensor:
        return torch.linalg.vector_norm(centred @ self.null_space.to(centred.device), dim=1)

    def _score(self, f: Features) -> Tensor:
        return self.alpha * self._residual(self._centred(f)) - torch.logsumexp(f64(f.logits), 1)


