"""OOD detection metrics: AUROC, AUPR-In, AUPR-Out and FPR95, optionally at a fixed ID:OOD base rate.

Convention: a score is an OOD score (higher = more OOD) and OOD is the positive class.
`fpr95` is the fraction of ID samples flagged as OOD at the threshold that detects 95 % of OOD
samples. `aupr_out` is average precision with OOD positive; `aupr_in` has ID positive and the
negated score. `fpr95_id_positive` is the other convention found in papers' code (ID positive,
95 % of ID retained, FPR measured on OOD) and is reported only under its own key.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRIC_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")
_ALL_KEYS = (*METRIC_KEYS, "fpr95_id_positive")
_TPR_LEVEL = 0.95

Scores = torch.Tensor | np.ndarray | Sequence[float]


def ood_metrics(
    scores_id: Scores,
    scores_ood: Scores,
    *,
    base_rate: float | Literal["all"] | None = None,
    num_draws: int = 5,
    seed: int = 0,
) -> dict[str, float | int]:
    """Metrics of one detector's scores on an ID set and an OOD set (all values in [0, 1]).

    `fpr95` takes no interpolation: on scikit-learn's ROC curve (every distinct threshold kept)
    it is the FPR of the first point, in order of decreasing threshold, whose TPR is >= 0.95,
    i.e. the smallest FPR of an actual threshold that detects at least 95 % of OOD samples.

    base_rate: None or "all" uses every sample once (`*_std` = 0.0, `num_draws` = 1). A number r
    evaluates at ID:OOD = r:1 (mixupoe App. C uses 5.0): the side that is too large for that
    ratio is subsampled without replacement, `num_draws` times with a numpy Generator seeded by
    `seed`; each metric is the mean over draws, `<key>_std` the population std (ddof=0), and
    `num_id` / `num_ood` are the per-draw counts.
    """
    s_id = _as_scores(scores_id, "scores_id")
    s_ood = _as_scores(scores_ood, "scores_ood")

    if base_rate is None or base_rate == "all":
        result: dict[str, float | int] = dict(_single_draw(s_id, s_ood))
        result.update({f"{k}_std": 0.0 for k in _ALL_KEYS})
        result.update(num_draws=1, num_id=len(s_id), num_ood=len(s_ood))
        return result

    ratio = _check_ratio(base_rate)
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral) or num_draws < 1:
        raise ValueError(f"num_draws must be a positive int, got {num_draws!r}")
    num_draws = int(num_draws)
    num_id, num_ood = _counts_at_ratio(len(s_id), len(s_ood), ratio)
    rng = np.random.default_rng(seed)
    draws = [
        _single_draw(_subsample(rng, s_id, num_id), _subsample(rng, s_ood, num_ood))
        for _ in range(num_draws)
    ]
    result = {}
    for key in _ALL_KEYS:
        values = np.array([d[key] for d in draws])
        result[key] = float(values.mean())
        result[f"{key}_std"] = float(values.std())
    result.update(num_draws=num_draws, num_id=num_id, num_ood=num_ood)
    return result


def _single_draw(s_id: np.ndarray, s_ood: np.ndarray) -> dict[str, float]:
    scores = np.concatenate([s_id, s_ood])
    is_ood = np.concatenate([np.zeros(len(s_id), dtype=int), np.ones(len(s_ood), dtype=int)])
    # Negation is exact in float64, so the ID-positive view ranks exactly the same samples.
    return {
        "auroc": float(roc_auc_score(is_ood, scores)),
        "aupr_in": float(average_precision_score(1 - is_ood, -scores)),
        "aupr_out": float(average_precision_score(is_ood, scores)),
        "fpr95": _fpr_at_tpr(is_ood, scores),
        "fpr95_id_positive": _fpr_at_tpr(1 - is_ood, -scores),
    }


def _fpr_at_tpr(labels: np.ndarray, scores: np.ndarray) -> float:
    # drop_intermediate=False: keep every threshold so the first qualifying point is a real one.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # tpr is non-decreasing and ends at 1.0, so argmax finds the first point and always exists.
    return float(fpr[np.argmax(tpr >= _TPR_LEVEL)])


def _as_scores(values: Scores, name: str) -> np.ndarray:
    # float64 before anything else: float32 (or a float32 cast of float64 data) would merge
    # scores that differ only beyond float32 precision and overflow values past ~3.4e38.
    if isinstance(values, torch.Tensor):
        array = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    num_nan = int(np.isnan(array).sum())
    num_inf = int(np.isinf(array).sum())
    if num_nan or num_inf:
        raise ValueError(
            f"{name} has {num_nan + num_inf} non-finite values ({num_nan} NaN, {num_inf} inf) "
            f"out of {array.size}"
        )
    return array


def _check_ratio(base_rate: object) -> float:
    if isinstance(base_rate, bool) or not isinstance(base_rate, numbers.Real):
        raise ValueError(f"base_rate must be None, 'all' or a positive ID:OOD ratio, got {base_rate!r}")
    ratio = float(base_rate)
    if not np.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"base_rate must be a positive finite ID:OOD ratio, got {base_rate!r}")
    return ratio


def _counts_at_ratio(n_id: int, n_ood: int, ratio: float) -> tuple[int, int]:
    # Keep the side that limits the ratio whole and shrink the other; at least one sample each,
    # since a metric needs both classes present.
    if n_id >= ratio * n_ood:
        return max(1, round(ratio * n_ood)), n_ood
    return n_id, max(1, round(n_id / ratio))


def _subsample(rng: np.random.Generator, values: np.ndarray, count: int) -> np.ndarray:
    if count >= len(values):
        return values
    return values[rng.choice(len(values), size=count, replace=False)]
