"""Streaming second moments and whitening: what the covariance scorers (Mahalanobis, ViM) share.

Speed comes from float32 GEMMs on the features as they arrive (`products="float32"`, the
scorers' default), accuracy from three things: each row is centred on its group's shift before
the product (the group's mean in the batch where it first appears: the products then see
within-group magnitudes, not the class means'), the batch products are accumulated in float64,
and every correction (group sums, counts, the point the scatter is taken about) is float64.
The float32 products still round at ~1e-7 of the covariance's entries, which the inverse
amplifies by up to its condition number: `products="float64"` (or float64 features) computes
everything in float64, at about twice the time."""

from __future__ import annotations

import torch
from torch import Tensor

STRIPE = 256  # columns per GEMM of the symmetric product: upper stripes only, ~56 % of a full product at D=2048


PRODUCTS = {"float32": torch.float32, "float64": torch.float64}


def products_dtype(name: str) -> torch.dtype:
    if name not in PRODUCTS:
        raise ValueError(f"products={name!r}: choose one of {', '.join(PRODUCTS)}")
    return PRODUCTS[name]


def compute_dtype(x: Tensor, products: torch.dtype) -> torch.dtype:
    """The dtype of the products for features `x`: float64 features stay float64."""
    return torch.float64 if x.dtype == torch.float64 else products


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, on its device: LAPACK's
    divide-and-conquer through scipy on the CPU (~1.5x torch's CPU eigh at D = 2048 here), torch's
    on an accelerator."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    import scipy.linalg

    values, vectors = scipy.linalg.eigh(matrix.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(values), torch.from_numpy(vectors)


class GroupedMoments:
    """Sums and the sum of outer products of rows x [n, D], each row centred on its group's shift.

    outer = sum_i (x_i - s_g(i))(x_i - s_g(i))^T (upper stripes while streaming), sums[g] =
    sum_{i in g} (x_i - s_g), counts[g]; from these, exactly, the within-group scatter and the
    scatter about any point (`scatter`)."""

    def __init__(self, num_groups: int, products: torch.dtype = torch.float32):
        self.num_groups = num_groups
        self.products = products
        self.outer: Tensor | None = None

    def update(self, x: Tensor, groups: Tensor) -> None:
        x = x.detach().to(compute_dtype(x, self.products))
        groups = groups.to(device=x.device, dtype=torch.long)
        if self.outer is None:
            d = x.shape[1]
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=x.device)
            self.sums = torch.zeros(self.num_groups, d, dtype=torch.float64, device=x.device)
            self.counts = torch.zeros(self.num_groups, dtype=torch.float64, device=x.device)
            self.shifts = torch.zeros(self.num_groups, d, dtype=x.dtype, device=x.device)
        elif x.shape[1] != self.outer.shape[0]:
            raise ValueError(f"feature width changed during fit: {x.shape[1]} vs {self.outer.shape[0]}")
        in_batch = torch.bincount(groups, minlength=self.num_groups).to(torch.float64)
        new = (in_batch > 0) & (self.counts == 0)
        if new.any():  # groups seen for the first time: their mean in this batch is their shift
            batch_sums = torch.zeros_like(self.sums).index_add_(0, groups, x.to(torch.float64))
            self.shifts[new] = (batch_sums[new] / in_batch[new, None]).to(x.dtype)
        centred = self.shifts.index_select(0, groups)
        torch.sub(x, centred, out=centred)  # in place: one [n, D] buffer per batch
        # the batch's group sums in the products' precision (centred rows: small sums), accumulated in float64
        self.sums += torch.zeros_like(self.shifts).index_add_(0, groups, centred).to(torch.float64)
        self.counts += in_batch
        d = x.shape[1]
        for i in range(0, d, STRIPE):
            self.outer[i:i + STRIPE, i:] += (centred[:, i:i + STRIPE].T @ centred[:, i:]).to(torch.float64)

    def finish(self) -> None:
        """Mirror the upper stripes (call once, after the last update)."""
        upper = self.outer.triu()
        self.outer = upper + upper.triu(1).T

    @property
    def total(self) -> float:
        return 0.0 if self.outer is None else float(self.counts.sum())

    def means(self) -> Tensor:
        """Per-group means [G, D] (float64; rows of unseen groups are 0)."""
        return self.sums / self.counts.clamp_min(1)[:, None] + self.shifts.to(torch.float64)

    def scatter(self, about: Tensor | None = None) -> Tensor:
        """sum_i (x_i - mu_g(i))(x_i - mu_g(i))^T (within groups) when `about` is None, else
        sum_i (x_i - about)(x_i - about)^T; float64 [D, D], symmetric."""
        if about is None:
            centred_means = self.sums / self.counts.clamp_min(1)[:, None]
            out = self.outer - self.sums.T @ centred_means
        else:
            d = self.shifts.to(torch.float64) - about.to(self.outer)  # [G, D]
            cross = self.sums.T @ d
            out = self.outer + cross + cross.T + (d.T * self.counts) @ d
        return (out + out.T) / 2


class Whitening:
    """z -> w(z) with ||w(z)||^2 = z^T pinv(cov) z, for rows z [n, D].

    Cholesky cov = L L^T, w(z) = z U with U = L^-T upper triangular, as GEMMs over column blocks
    (block j reads only the first j+1 blocks of z: ~56 % of a full product at D = 2048, in the
    rows' compute precision). When cov is singular (Cholesky fails) or its pivots span more than
    pinv's cutoff (1 / (D * eps)), w(z) = z U_+ diag(lambda_+)^-1/2 over the eigenpairs pinv keeps:
    exactly pinv's quadratic form."""

    def __init__(self, cov: Tensor):
        cutoff = cov.shape[0] * torch.finfo(cov.dtype).eps
        lower, info = torch.linalg.cholesky_ex(cov)
        pivots = lower.diagonal() ** 2
        self.triangular = int(info) == 0 and float(pivots.min()) > cutoff * float(pivots.max())
        if self.triangular:
            eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
            self.map = torch.linalg.solve_triangular(lower, eye, upper=False).mT.contiguous()  # L^-T
        else:
            values, vectors = symmetric_eigh(cov)
            keep = values > cutoff * values.abs().max()
            self.map = vectors[:, keep] / values[keep].sqrt()
        self._cast: dict[tuple, Tensor] = {}

    def _matrix(self, like: Tensor) -> Tensor:
        """The map in the rows' dtype and device (cast once)."""
        key = (like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self.map.to(like).contiguous()
        return self._cast[key]

    def __call__(self, z: Tensor) -> list[Tensor]:
        """w(z) as column blocks (concatenated, they are w(z); kept apart, nothing is copied)."""
        matrix = self._matrix(z)
        if not self.triangular:
            return [z @ matrix]
        return [z[:, :j + STRIPE] @ matrix[:j + STRIPE, j:j + STRIPE] for j in range(0, matrix.shape[1], STRIPE)]

    def columns(self) -> list[slice]:
        """The column ranges of the blocks `__call__` returns."""
        width = self.map.shape[1]
        step = STRIPE if self.triangular else max(width, 1)
        return [slice(j, j + step) for j in range(0, width, step)]

    def __getstate__(self) -> dict:  # the casts are a cache, not state
        return {**self.__dict__, "_cast": {}}
