"""Subspace scorer: ViM (Wang et al. 2022), the residual off the ID features' principal subspace."""

from __future__ import annotations

import torch
from torch import Tensor

from disttrain.ood.scorers.base import ClassifierScorer, Features, f64, register
from disttrain.ood.scorers.moments import GroupedMoments, compute_dtype, products_dtype, symmetric_eigh


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

    Two fit passes (fit_passes=2): pass 1 accumulates sum (x-u)(x-u)^T and the max-logit sum; its
    fit_end computes the subspace (float64 eigh, once); pass 2 accumulates the residual norms;
    its fit_end sets alpha. `fit(data)` runs both (data must be re-iterable or a callable).

    Speed and precision (`products`, as for Mahalanobis; see moments.py): pass 1's products run as
    float32 GEMMs of rows centred on their predicted class's shift, accumulated in float64, and
    the scatter about u is completed in float64; the residual is x N - u N, x N a float32 GEMM.
    The principal subspace's cut falls between nearly equal eigenvalues, which float32 rounding
    of the scatter rotates slightly: scores agree with all-float64 (`products="float64"`) to
    ~5e-6 relative on the benchmark's data (recipes/benchmark_scorers.py reports the figure)."""

    needs_fit = True
    fit_passes = 2

    def __init__(self, *, dim: int | None = None, products: str = "float32", weight: Tensor | None = None,
                 bias: Tensor | None = None):
        if dim is not None and int(dim) < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        self.dim = None if dim is None else int(dim)
        self.products = products
        self._products = products_dtype(products)
        super().__init__(weight=weight, bias=bias)

    def _classifier_set(self) -> None:
        self.origin = -(torch.linalg.pinv(self.weight) @ self.bias)  # u = -pinv(W) b

    def _reset_stats(self) -> None:
        self._moments: GroupedMoments | None = None
        self._n = 0
        self._maxlogit_sum = 0.0
        self._residual_sum = 0.0
        self._n2 = 0

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        if pass_index == 0:
            if self._moments is None:
                self._moments = GroupedMoments(f.logits.shape[1], self._products)
            self._moments.update(f.penultimate, f.logits.argmax(1))
            self._n += len(f)
            self._maxlogit_sum += float(f64(f.logits).amax(1).sum())
        else:
            self._residual_sum += float(self._residual(f).sum())
            self._n2 += len(f)

    def _fit_end(self, pass_index: int) -> None:
        if pass_index == 0:
            if self._n == 0:
                raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
            moments = self._moments
            moments.finish()
            width = moments.outer.shape[0]
            dim = vim_default_dim(width) if self.dim is None else self.dim
            if not 0 < dim < width:
                raise ValueError(f"scorer {self.name!r}: dim={dim} must be in [1, {width - 1}] for {width}-d features")
            self.principal_dim = dim
            origin = self.origin.to(moments.outer.device)
            eigvals, eigvecs = symmetric_eigh(moments.scatter(about=origin) / self._n)  # ascending
            self.null_space = eigvecs[:, :width - dim].contiguous()  # [D, D - dim]: the smallest eigenvalues
            self._null_space_products = self.null_space.to(moments.shifts.dtype)
            self.origin_projected = origin @ self.null_space  # u N, float64
            self._moments = None
        else:
            if self._n2 == 0:
                raise RuntimeError(f"scorer {self.name!r}: no ID samples seen in the second fit pass")
            mean_residual = self._residual_sum / self._n2
            self.alpha = (self._maxlogit_sum / self._n) / mean_residual if mean_residual > 0 else 0.0

    def _residual(self, f: Features) -> Tensor:
        """||(x - u) N|| = ||x N - u N||: x N a GEMM in the products' precision, u N float64."""
        x = f.penultimate
        null_space = self._null_space_products.to(x.device, compute_dtype(x, self._products))
        projected = f64(x.to(null_space.dtype) @ null_space) - self.origin_projected.to(x.device)
        return torch.linalg.vector_norm(projected, dim=1)

    def _score(self, f: Features) -> Tensor:
        return self.alpha * self._residual(f) - torch.logsumexp(f64(f.logits), 1)
