"""The one stream sampler of the scorers (ReAct's activation sample, Gram's held-out samples)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Reservoir:
    """A seeded uniform sample, without replacement, of at most `size` rows of a stream.

    Bottom-k sampling: every row has a uniform key and the `size` smallest keys are kept. Keys
    are only drawn for the rows that can enter: while the sample fills, every row; once it is
    full, with bound = the largest kept key, a row enters with probability `bound`, so the
    entering positions are drawn as geometric gaps and their keys uniform below the bound (the
    same distribution as a key per row, without one). A stream of N rows then costs about
    size * (1 + ln(N / size)) random numbers, not N. The sample is exact (every row) while the
    stream has at most `size` rows; it is the same for the same batches and seed.

    Rows are given as columns, tensors with a common first dimension (`add(values)`,
    `add(labels, features)`); the sample stays on their device. The random numbers come from a
    CPU generator (a few per entering row)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"reservoir size {size} must be >= 1")
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.columns: tuple[Tensor, ...] = ()
        self.keys = torch.empty(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, *columns: Tensor, report: bool = True) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """Offer a batch of rows. With `report`, returns (kept: bool [n], which of the batch's rows
        are in the sample now; evicted: the columns of earlier rows that left it)."""
        n, device = len(columns[0]), columns[0].device
        fill = min(n, self.size - len(self))
        keys = torch.rand(fill, generator=self.generator, dtype=torch.float64)
        positions = torch.arange(fill)
        if n > fill:  # the sample is full once the first `fill` rows are in
            bound = max(float(self.keys.max()) if len(self) else 0.0, float(keys.max()) if fill else 0.0)
            extra = self._entering(n - fill, bound) + fill
            keys = torch.cat([keys, torch.rand(len(extra), generator=self.generator, dtype=torch.float64) * bound])
            positions = torch.cat([positions, extra])
        positions, keys = positions.to(device), keys.to(device)
        old = len(self)
        all_keys = torch.cat([self.keys.to(device), keys])
        chosen = all_keys.topk(self.size, largest=False, sorted=False).indices if len(all_keys) > self.size else None
        entering = tuple(c[positions] for c in columns)
        merged = tuple(torch.cat(pair) for pair in zip(self.columns, entering)) if self.columns else entering
        in_sample = torch.ones(len(all_keys), dtype=torch.bool, device=device)
        if chosen is not None:
            in_sample.zero_()[chosen] = True
            merged, all_keys = tuple(c[chosen] for c in merged), all_keys[chosen]
        before = self.columns
        self.columns, self.keys = merged, all_keys
        if not report:
            return None
        kept = torch.zeros(n, dtype=torch.bool, device=device)
        kept[positions[in_sample[old:]]] = True
        return kept, tuple(c[~in_sample[:old]] for c in before) if before else tuple(c[:0] for c in columns)

    def _entering(self, n: int, bound: float) -> Tensor:
        """Positions in [0, n) of the rows whose key would fall below `bound`: geometric gaps."""
        if bound <= 0:
            return torch.empty(0, dtype=torch.long)
        log_reject = math.log1p(-bound)
        found, start = [], 0
        while True:
            draws = max(16, int(1.2 * (n - start) * bound) + 16)
            u = torch.rand(draws, generator=self.generator, dtype=torch.float64)
            gaps = (torch.log1p(-u) / log_reject).floor().clamp_max(n).long()  # rejected rows before the next
            positions = start + torch.cumsum(gaps + 1, 0) - 1
            found.append(positions[positions < n])
            if positions[-1] >= n:
                return torch.cat(found)
            start = int(positions[-1]) + 1


def linear_percentile(values: Tensor, q: float) -> float:
    """numpy's default ('linear') percentile of a 1-d tensor, q in [0, 100]; no size limit."""
    v = values.double().sort().values
    pos = q / 100 * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (pos - lo) * (v[hi] - v[lo]))
