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
        self.seen = 0  # rows offered so far
        self.generator = torch.Generator().manual_seed(seed)
        self.columns: tuple[Tensor, ...] = ()
        self.keys = torch.empty(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, *columns: Tensor, report: bool = True) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """Offer a batch of rows. With `report`, returns (kept: bool [n], which of the batch's rows
        are in the sample now; evicted: the columns of earlier rows that left it)."""
        n, device = len(columns[0]), columns[0].device
        columns_before, keys_before = self.columns, self.keys
        # the rows that enter (position in the batch, key), merged in pieces no longer than the stream
        # seen before them: the bound falls as the stream grows, and each piece brings ~size entries
        positions, keys = [], []
        start = 0
        while start < n:
            if len(self) < self.size:
                length = min(n - start, self.size - len(self))
                piece = torch.arange(start, start + length)
                piece_keys = torch.rand(length, generator=self.generator, dtype=torch.float64)
            else:
                length = min(n - start, max(self.seen, self.size))
                bound = float(self.keys.max())
                piece = self._entering(length, bound) + start
                piece_keys = torch.rand(len(piece), generator=self.generator, dtype=torch.float64) * bound
            piece, piece_keys = piece.to(device), piece_keys.to(device)
            self._merge(tuple(c[piece] for c in columns), piece_keys)
            positions.append(piece)
            keys.append(piece_keys)
            self.seen += length
            start += length
        if not report:
            return None
        kept = torch.zeros(n, dtype=torch.bool, device=device)
        if positions:  # keys are distinct (float64 uniforms): a key still held is its row still held
            entered, entered_keys = torch.cat(positions), torch.cat(keys)
            kept[entered[torch.isin(entered_keys, self.keys)]] = True
        if not columns_before:
            return kept, tuple(c[:0] for c in columns)
        left = ~torch.isin(keys_before.to(device), self.keys)
        return kept, tuple(c[left] for c in columns_before)

    def _merge(self, entering: tuple[Tensor, ...], keys: Tensor) -> None:
        """Add rows with their keys; keep the `size` smallest keys."""
        merged = tuple(torch.cat(pair) for pair in zip(self.columns, entering)) if self.columns else entering
        all_keys = torch.cat([self.keys.to(keys.device), keys])
        if len(all_keys) > self.size:
            chosen = all_keys.topk(self.size, largest=False, sorted=False).indices
            merged, all_keys = tuple(c[chosen] for c in merged), all_keys[chosen]
        self.columns, self.keys = merged, all_keys

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
