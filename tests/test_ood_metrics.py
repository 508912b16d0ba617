"""OOD metrics on hand-computed cases, the 5:1 base-rate subsampling, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disttrain.ood import metrics
from disttrain.ood.metrics import METRIC_KEYS, ood_metrics


def test_metric_keys_and_output_layout():
    assert METRIC_KEYS == ("auroc", "aupr_in", "aupr_out", "fpr95")
    out = ood_metrics([0.0, 1.0, 2.0], [1.5, 3.0])
    expected = {*METRIC_KEYS, "fpr95_id_positive", "num_draws", "num_id", "num_ood"}
    expected |= {f"{k}_std" for k in (*METRIC_KEYS, "fpr95_id_positive")}
    assert set(out) == expected
    assert all(isinstance(out[k], float) and 0.0 <= out[k] <= 1.0 for k in METRIC_KEYS)


def test_perfect_separation():
    out = ood_metrics([0.0, 0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    assert out["auroc"] == 1.0 and out["aupr_in"] == 1.0 and out["aupr_out"] == 1.0
    assert out["fpr95"] == 0.0 and out["fpr95_id_positive"] == 0.0


def test_perfect_inversion():
    out = ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert out["auroc"] == 0.0
    assert out["fpr95"] == 1.0 and out["fpr95_id_positive"] == 1.0


def test_ties_count_as_one_half():
    # Pairs (ood, id) of 16, ties 1/2: ood=1 -> 1 win + 2 ties = 2; the other ood=1 -> 2;
    # ood=2 -> 3 wins + 1 tie = 3.5; ood=3 -> 4. AUROC = 11.5 / 16.
    # FPR95: detecting all 4 OOD (3/4 < 0.95) needs threshold 1, which flags id 1, 1, 2 -> 3/4.
    # ID-positive: keeping all 4 ID needs threshold 2, which keeps ood 1, 1, 2 -> 3/4.
    out = ood_metrics([0, 1, 1, 2], [1, 1, 2, 3])
    assert out["auroc"] == pytest.approx(11.5 / 16)
    assert out["fpr95"] == pytest.approx(0.75)
    assert out["fpr95_id_positive"] == pytest.approx(0.75)


def test_constant_scores():
    # One threshold only: AUROC is chance, every sample is flagged, and average precision
    # collapses to the positive class's share (OOD 1/4 for AUPR-Out, ID 3/4 for AUPR-In).
    out = ood_metrics([2.0, 2.0, 2.0], [2.0])
    assert out["auroc"] == 0.5
    assert out["fpr95"] == 1.0 and out["fpr95_id_positive"] == 1.0
    assert out["aupr_out"] == pytest.approx(0.25) and out["aupr_in"] == pytest.approx(0.75)


def test_asymmetric_case_separates_the_two_fpr95_conventions():
    # id=[0, 2], ood=[1, 3, 4]. AUROC: ood 1 beats 1, ood 3 and 4 beat 2 each -> 5/6.
    # AUPR-Out (ranking 4o 3o 2i 1o 0i): precisions at the OOD hits 1, 1, 3/4 -> 11/12.
    # AUPR-In (ranking by -s: 0i -1o -2i -3o -4o): precisions at the ID hits 1, 2/3 -> 5/6.
    # FPR95: all 3 OOD need threshold 1, flagging id 2 -> 1/2.
    # ID-positive: both ID kept needs s <= 2, which keeps ood 1 -> 1/3.
    out = ood_metrics([0.0, 2.0], [1.0, 3.0, 4.0])
    assert out["auroc"] == pytest.approx(5 / 6)
    assert out["aupr_out"] == pytest.approx(11 / 12)
    assert out["aupr_in"] == pytest.approx(5 / 6)
    assert out["fpr95"] == pytest.approx(1 / 2)
    assert out["fpr95_id_positive"] == pytest.approx(1 / 3)


def test_fpr95_threshold_at_exactly_95_percent():
    # 20 OOD: missing one is TPR 19/20 = 0.95, which qualifies.
    out = ood_metrics([0.0] * 20, [-10.0] + [10.0] * 19)
    assert out["fpr95"] == 0.0
    # Missing two (TPR 0.9) does not: the threshold drops to -10 and flags every ID sample,
    # while keeping 19/20 ID (s <= 0) lets only the two OOD at -10 through -> 0.1.
    out = ood_metrics([0.0] * 19 + [20.0], [-10.0] * 2 + [10.0] * 18)
    assert out["fpr95"] == 1.0
    assert out["fpr95_id_positive"] == pytest.approx(0.1)


def test_fpr95_uses_every_threshold():
    # Tied (ID, OOD) pairs at 5 and at 4 put (0, .9), (.05, .95), (.1, 1) on one line; a curve
    # thinned to its corners would skip the middle point and report 0.1 instead of 0.05.
    out = ood_metrics([0.0] * 18 + [5.0, 4.0], [10.0] * 18 + [5.0, 4.0])
    assert out["fpr95"] == pytest.approx(0.05)


def test_huge_score_ranges():
    # A min-max normalisation over +-1e30 would merge 0, 1, 2 and 3 into ties.
    out = ood_metrics([-1e30, 0.0, 1.0], [2.0, 3.0, 1e30])
    assert out["auroc"] == 1.0 and out["fpr95"] == 0.0 and out["aupr_in"] == 1.0
    # Values past float32's range must stay finite (a float32 cast turns them into inf).
    out = ood_metrics([-1e300, 0.0], [1.0, 1e300])
    assert out["auroc"] == 1.0 and out["fpr95"] == 0.0


def test_float32_input_and_differences_below_float32_precision():
    id32 = torch.ones(4, dtype=torch.float32)
    ood32 = torch.nextafter(id32, torch.tensor(2.0))
    out = ood_metrics(id32, ood32)
    assert out["auroc"] == 1.0 and out["fpr95"] == 0.0
    # 1 + 1e-12 rounds to 1.0 in float32: the comparison must be made in float64.
    out = ood_metrics(id32, np.full(3, 1.0 + 1e-12))
    assert out["auroc"] == 1.0 and out["fpr95"] == 0.0
    out = ood_metrics(id32, torch.full((3,), 1.0 + 1e-12, dtype=torch.float64))
    assert out["auroc"] == 1.0 and out["fpr95"] == 0.0
    out = ood_metrics(np.float32([3e38, 3e38]), np.float32([-3e38]))
    assert out["auroc"] == 0.0
    # numpy has no bfloat16, so such tensors must be converted by torch.
    out = ood_metrics(torch.zeros(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
    assert out["auroc"] == 1.0


def test_input_types_agree():
    rng = np.random.default_rng(1)
    s_id, s_ood = rng.normal(size=30), rng.normal(1.0, size=20)
    reference = ood_metrics(s_id, s_ood)
    assert ood_metrics(list(s_id), list(s_ood)) == reference
    assert ood_metrics(torch.tensor(s_id, requires_grad=True), torch.tensor(s_ood)) == reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_brute_force_pairs(seed):
    rng = np.random.default_rng(seed)
    # Integer scores on a small range so that ties are frequent.
    s_id = rng.integers(0, 8, size=25).astype(float)
    s_ood = rng.integers(2, 10, size=17).astype(float)
    diff = s_ood[:, None] - s_id[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(brute, abs=1e-12)


def test_all_and_none_use_every_sample_once():
    s_id, s_ood = np.arange(7.0), np.arange(3.0) + 2.5
    out = ood_metrics(s_id, s_ood, base_rate="all")
    assert out == ood_metrics(s_id, s_ood, base_rate=None)
    assert (out["num_draws"], out["num_id"], out["num_ood"]) == (1, 7, 3)
    assert all(out[f"{k}_std"] == 0.0 for k in (*METRIC_KEYS, "fpr95_id_positive"))


@pytest.mark.parametrize(
    ("n_id", "n_ood", "expected"),
    [(1000, 1000, (1000, 200)), (100, 1000, (100, 20)), (600, 100, (500, 100)), (500, 100, (500, 100))],
)
def test_base_rate_counts_follow_the_ratio(n_id, n_ood, expected):
    rng = np.random.default_rng(0)
    out = ood_metrics(rng.normal(size=n_id), rng.normal(size=n_ood), base_rate=5.0, num_draws=2)
    assert (out["num_id"], out["num_ood"]) == expected
    assert out["num_draws"] == 2


def test_base_rate_subsamples_without_replacement(monkeypatch):
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    single_draw = metrics._single_draw

    def spy(s_id, s_ood):
        seen.append((s_id.copy(), s_ood.copy()))
        return single_draw(s_id, s_ood)

    monkeypatch.setattr(metrics, "_single_draw", spy)
    # All scores distinct; 90 of 100 OOD per draw, so drawing with replacement would repeat some.
    s_id, s_ood = np.arange(450.0), np.arange(100.0) + 0.5
    out = ood_metrics(s_id, s_ood, base_rate=5.0, num_draws=3)
    assert len(seen) == 3 and out["num_draws"] == 3
    for drawn_id, drawn_ood in seen:
        np.testing.assert_array_equal(np.sort(drawn_id), s_id)  # the limiting side is whole
        assert len(drawn_ood) == 90 and len(np.unique(drawn_ood)) == 90
        assert np.isin(drawn_ood, s_ood).all()
    assert len({tuple(np.sort(o)) for _, o in seen}) > 1  # the draws differ


def test_base_rate_is_deterministic_per_seed():
    rng = np.random.default_rng(3)
    s_id, s_ood = rng.normal(size=200), rng.normal(0.5, size=200)
    first = ood_metrics(s_id, s_ood, base_rate=5.0, seed=7)
    assert first == ood_metrics(s_id, s_ood, base_rate=5.0, seed=7)
    assert first != ood_metrics(s_id, s_ood, base_rate=5.0, seed=8)
    assert first["num_draws"] == 5  # the default for a ratio
    assert first["auroc_std"] > 0.0


def test_base_rate_already_met_matches_all():
    rng = np.random.default_rng(4)
    s_id, s_ood = rng.normal(size=50), rng.normal(1.0, size=10)
    full = ood_metrics(s_id, s_ood)
    at_ratio = ood_metrics(s_id, s_ood, base_rate=5.0)
    for key in (*METRIC_KEYS, "fpr95_id_positive"):
        assert at_ratio[key] == pytest.approx(full[key])
        assert at_ratio[f"{key}_std"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["scores_id", "scores_ood"])
def test_non_finite_scores_name_the_set_and_count(bad, which):
    good, broken = [0.0, 1.0, 2.0], [0.0, bad, 1.0, bad]
    args = (broken, good) if which == "scores_id" else (good, broken)
    with pytest.raises(ValueError, match=rf"^{which} has 2 non-finite values"):
        ood_metrics(*args)


@pytest.mark.parametrize("which", ["scores_id", "scores_ood"])
def test_empty_set_is_named(which):
    args = ([], [1.0]) if which == "scores_id" else ([1.0], torch.empty(0))
    with pytest.raises(ValueError, match=rf"^{which} is empty"):
        ood_metrics(*args)


def test_rejects_non_1d_and_bad_base_rate_arguments():
    with pytest.raises(ValueError, match="scores_ood must be 1-D"):
        ood_metrics([1.0, 2.0], [[1.0], [2.0]])
    for bad_rate in (0.0, -5.0, float("nan"), "5:1", True):
        with pytest.raises(ValueError, match="base_rate"):
            ood_metrics([1.0, 2.0], [3.0], base_rate=bad_rate)
    with pytest.raises(ValueError, match="num_draws"):
        ood_metrics([1.0, 2.0], [3.0], base_rate=5.0, num_draws=0)
