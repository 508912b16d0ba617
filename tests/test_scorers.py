"""OOD scorers: every registered scorer end to end on a tiny timm model, each against its defining
formula (independent numpy computations), softmax scores that keep confident inputs ranked,
higher = more OOD, errors, and input preprocessing."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from disttrain.ood import scorers
from disttrain.ood.scorers import Features, gram_block_features, input_perturbation
from disttrain.ood.scorers.sampling import Reservoir

NUM_CLASSES = 5


# ----------------------------------------------------------------------------- helpers

def _timm_features(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                   block_kind: str | None = None, powers: int = 10) -> Features:
    """Logits, penultimate and (on request) per-block features of a timm model (test-local extractor)."""
    blocks = None
    if block_kind is None:
        final = model.forward_features(images)
    else:
        final, maps = model.forward_intermediates(images, indices=[1, 2, 3, 4])  # layer1..layer4
        blocks = [m.mean((2, 3)) if block_kind == "pooled" else gram_block_features(m, powers) for m in maps]
    return Features(logits=model.forward_head(final), penultimate=model.forward_head(final, pre_logits=True),
                    blocks=blocks, labels=labels)


def _build(name: str, hp: dict, head: torch.nn.Linear | None = None) -> scorers.Scorer:
    scorer = scorers.get(name, **hp)
    if scorer.needs_classifier:
        scorer.set_classifier(head.weight, head.bias)
    return scorer


def _block_kind(scorer: scorers.Scorer) -> str | None:
    return scorer.block_features if scorer.needs_blocks else None


def _split(f: Features, sizes: list[int]) -> list[Features]:
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(Features(logits=f.logits[sl], penultimate=None if f.penultimate is None else f.penultimate[sl],
                            blocks=None if f.blocks is None else [b[sl] for b in f.blocks],
                            labels=None if f.labels is None else f.labels[sl]))
        start += n
    assert start == len(f)
    return out


# ----------------------------------------------------------------------------- 1. end to end

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = __import__("timm").create_model("resnet10t", num_classes=NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(1)
    train = torch.randn(40, 3, 32, 32, generator=g)
    train_labels = torch.arange(40) % NUM_CLASSES
    test = torch.randn(8, 3, 32, 32, generator=g)
    return model, train, train_labels, test


VARIANTS = [(name, {}) for name in scorers.names()] + [
    ("odin", {"epsilon": 0.002}),
    ("mahalanobis", {"use_blocks": True}),
    ("mahalanobis", {"use_blocks": True, "epsilon": 0.002}),
    ("gram", {"powers": 3}),
]


def test_every_registered_scorer_is_exercised():
    assert scorers.names() == list(scorers.SCORERS)
    assert {"msp", "odin", "energy", "maxlogit", "entropy", "kl_matching", "mahalanobis", "gram", "vim",
            "react"} <= set(scorers.names())
    assert {name for name, _ in VARIANTS} == set(scorers.names())


@pytest.mark.parametrize("name, hp", VARIANTS, ids=[f"{n}{hp or ''}" for n, hp in VARIANTS])
def test_scorer_fits_and_scores_timm_features(tiny_model, name, hp):
    model, train, train_labels, test = tiny_model
    scorer = _build(name, hp, model.get_classifier())
    kind, powers = _block_kind(scorer), getattr(scorer, "powers", 10)

    def extract(x, labels=None):
        return _timm_features(model, x, labels, kind, powers)

    with torch.no_grad():
        batches = [extract(train[i:i + 10], train_labels[i:i + 10]) for i in range(0, 40, 10)]
    assert scorer.fit(batches) is scorer and scorer.is_fitted
    images = scorer.perturb(extract, test)
    assert (not torch.equal(images, test)) == scorer.needs_input_grad
    with torch.no_grad():
        scores = scorer.score(extract(images))
    assert scores.shape == (len(test),) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()
    assert scores.std() > 0  # not a constant


# ----------------------------------------------------------------------------- 2. formulas

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [3.0, -1.0, 0.5]])


def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_lse(z):
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def _np_log_not_max(p):
    """log(1 - max p) as the log of the other probabilities' sum (no cancellation)."""
    return np.log(np.sort(p, 1)[:, :-1].sum(1))


# MSP and ODIN store log(1 - max softmax), rank-equivalent to the paper's -max softmax (checked below)
LOGIT_FORMULAS = [
    ("msp", {}, lambda z: _np_log_not_max(_np_softmax(z))),
    ("odin", {}, lambda z: _np_log_not_max(_np_softmax(z / 1000))),
    ("odin", {"temperature": 2.0}, lambda z: _np_log_not_max(_np_softmax(z / 2))),
    ("energy", {}, lambda z: -_np_lse(z)),
    ("energy", {"temperature": 3.0}, lambda z: -3 * _np_lse(z / 3)),
    ("maxlogit", {}, lambda z: -z.max(1)),
    ("entropy", {}, lambda z: -(_np_softmax(z) * np.log(_np_softmax(z))).sum(1)),
]


@pytest.mark.parametrize("name, hp, formula", LOGIT_FORMULAS, ids=[f"{n}{hp or ''}" for n, hp, _ in LOGIT_FORMULAS])
def test_logit_scorer_matches_formula(name, hp, formula):
    got = scorers.get(name, **hp).score(Features(logits=LOGITS.double())).numpy()
    np.testing.assert_allclose(got, formula(LOGITS.double().numpy()), rtol=1e-12, atol=1e-15)
    # float32 features (what the extractor gives) are returned as float64 (energy, maxlogit: computed in float32)
    got32 = scorers.get(name, **hp).score(Features(logits=LOGITS))
    assert got32.dtype == torch.float64
    np.testing.assert_allclose(got32.numpy(), formula(LOGITS.double().numpy()), rtol=1e-6, atol=1e-6)


def test_logit_scorers_hand_values():
    e2 = math.exp(2)
    f = Features(logits=LOGITS[:2].double())
    msp = scorers.get("msp").score(f)
    np.testing.assert_allclose(msp, [math.log(2 / (e2 + 2)), math.log(2 / 3)], rtol=1e-12)
    # the paper's quantities from the stored ones
    np.testing.assert_allclose(scorers.MSP.confidence(msp), [e2 / (e2 + 2), 1 / 3], rtol=1e-12)
    np.testing.assert_allclose(scorers.MSP.paper_score(msp.numpy()), [-e2 / (e2 + 2), -1 / 3], rtol=1e-12)
    np.testing.assert_allclose(scorers.get("energy").score(f), [-math.log(e2 + 2), -(1 + math.log(3))], rtol=1e-12)
    np.testing.assert_allclose(scorers.get("maxlogit").score(f), [-2, -1])
    p = np.array([e2, 1, 1]) / (e2 + 2)
    np.testing.assert_allclose(scorers.get("entropy").score(f), [-(p * np.log(p)).sum(), math.log(3)], rtol=1e-12)
    # ODIN at T=1000: max softmax of logits/1000 is [e^.002/(e^.002+2), 1/3]; stored: log(1 - that)
    e = math.exp(0.002)
    odin = scorers.get("odin").score(f)
    np.testing.assert_allclose(odin, [math.log(2 / (e + 2)), math.log(2 / 3)], rtol=1e-12)
    np.testing.assert_allclose(scorers.ODIN.paper_score(odin), [-e / (e + 2), -1 / 3], rtol=1e-12)
    # CMG's ood_class: log of the last output's softmax probability
    ood = scorers.get("ood_class").score(f)
    np.testing.assert_allclose(ood, [-math.log(e2 + 2), -math.log(3)], rtol=1e-12)
    np.testing.assert_allclose(scorers.OODClass.paper_score(ood), [1 / (e2 + 2), 1 / 3], rtol=1e-12)
    energy = scorers.get("energy").score(f)
    assert scorers.Energy.paper_score(energy) is energy  # stored as the paper writes it


def test_paper_score_is_rank_equivalent_for_every_scorer():
    """The stored score and `paper_score` of it rank alike (the metrics are the paper's)."""
    stored = torch.linspace(-60.0, -1e-3, 101, dtype=torch.float64)
    for name in scorers.names():
        paper = scorers.SCORERS[name].paper_score(stored)
        assert paper.dtype == torch.float64 and (paper.diff() >= 0).all(), name
        np.testing.assert_allclose(scorers.SCORERS[name].paper_score(stored.numpy()), paper.numpy(), rtol=1e-15)


def test_kl_matching_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    fit_logits = torch.randn(60, 4, generator=g) * 2
    fit_logits[torch.arange(60), torch.arange(60) % 3] += 3
    fit_logits[:, 3] -= 20  # classes 0..2 predicted, class 3 never: no template
    test_logits = torch.randn(7, 4, generator=g)
    scorer = scorers.get("kl_matching").fit([Features(logits=fit_logits[:25]), Features(logits=fit_logits[25:])])
    got = scorer.score(Features(logits=test_logits)).numpy()

    p_fit = _np_softmax(fit_logits.double().numpy())
    pred = p_fit.argmax(1)
    templates = np.stack([p_fit[pred == k].mean(0) for k in range(4) if (pred == k).any()])
    assert len(templates) == 3
    p = _np_softmax(test_logits.double().numpy())
    kl = np.array([[(pi * np.log(pi / d)).sum() for d in templates] for pi in p])
    np.testing.assert_allclose(got, kl.min(1), rtol=1e-10)
    assert (got >= -1e-12).all()


# ----------------------------------------------------------------------------- 2b. confident inputs stay ranked

GAPS = torch.arange(20.0, 50.25, 0.25)  # max logit minus the runner-up; a float32 softmax is 1.0 from ~17 on


def _confident_logits(gaps: torch.Tensor, num_classes: int = 10, scale: float = 1.0) -> torch.Tensor:
    """Row i: class 0 leads by gaps[i], the others trail it by gaps[i] + 0..2; float32, as the extractor
    gives. `scale` multiplies every logit (ODIN divides them by its temperature)."""
    z = torch.zeros(len(gaps), num_classes, dtype=torch.float64)
    z[:, 0] = 7.0
    z[:, 1:] = 7.0 - gaps[:, None] - torch.linspace(0, 2, num_classes - 1, dtype=torch.float64)
    return (z * scale).float()


def _with_trailing_extra_output(logits: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """An (N+1)-th output (CMG-softmax's OOD class) trailing the leading ID class by gaps + 1."""
    return torch.cat([logits, logits.amax(1, keepdim=True) - gaps[:, None] - 1.0], 1)


def _decimal_log_softmax(row: list[float], temperature: float = 1.0) -> list[Decimal]:
    """Reference log softmax of one row of logits / temperature, in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        z = [Decimal(v) / Decimal(temperature) for v in row]
        top = max(z)
        norm = sum((v - top).exp() for v in z).ln()
        return [v - top - norm for v in z]


def _decimal_log_not_max(logp: list[Decimal]) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 60
        top = logp.index(max(logp))
        return sum(v.exp() for i, v in enumerate(logp) if i != top).ln()


def _decimal_entropy(logp: list[Decimal]) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 60
        return -sum(v.exp() * v for v in logp)


# (scorer, hyper-parameters, logits, reference of one row's score, +1 / -1: the scores rise / fall with the gap)
SATURATED = [
    ("msp", {}, _confident_logits(GAPS), lambda z: _decimal_log_not_max(_decimal_log_softmax(z)), -1),
    ("odin", {"temperature": 1.0}, _confident_logits(GAPS),
     lambda z: _decimal_log_not_max(_decimal_log_softmax(z)), -1),
    ("odin", {}, _confident_logits(GAPS, scale=1000.0),
     lambda z: _decimal_log_not_max(_decimal_log_softmax(z, 1000.0)), -1),
    ("entropy", {}, _confident_logits(GAPS), lambda z: _decimal_entropy(_decimal_log_softmax(z)), -1),
    # CMG-softmax, a confident ID input: the OOD output trails the ID class
    ("ood_class", {}, _with_trailing_extra_output(_confident_logits(GAPS), GAPS), lambda z: _decimal_log_softmax(z)[-1],
     -1),
    # ... an OOD input: the OOD output leads by the gap; its probability rounds to 1.0, its log does not
    ("ood_class", {}, _confident_logits(GAPS)[:, [*range(1, 10), 0]], lambda z: _decimal_log_softmax(z)[-1], 1),
]


@pytest.mark.parametrize("name, hp, logits, reference, direction", SATURATED,
                         ids=["msp", "odin-T1", "odin-T1000", "entropy", "ood_class-id", "ood_class-ood"])
def test_softmax_scores_keep_confident_inputs_ranked(name, hp, logits, reference, direction):
    """Logit gaps of 20..50 (x T for ODIN): every score distinct, ordered by the gap, and equal to a
    60-digit reference of the stored statistic computed from the same float32 logits."""
    got = scorers.get(name, **hp).score(Features(logits=logits))
    want = [float(reference(row)) for row in logits.double().tolist()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    wrong = direction * got.diff() <= 0
    assert not wrong.any(), f"{name}: ties or inversions at gaps {GAPS[1:][wrong].tolist()}"


def test_msp_and_odin_never_tie_on_a_finite_gap():
    gaps = torch.tensor([50.0, 100.0, 700.0, 1000.0, 1e4, 1e5])  # the softmax's runners-up underflow from ~745
    for name, hp in [("msp", {}), ("odin", {"temperature": 2.0})]:
        got = scorers.get(name, **hp).score(Features(logits=_confident_logits(gaps)))
        assert torch.isfinite(got).all() and (got.diff() < 0).all(), name


def _decimal_kl_matching(row: list[float], log_templates: torch.Tensor) -> Decimal:
    """min_k KL(p || d_k) in 60 digits, with the scorer's fitted (float64) log templates taken as exact."""
    logp = _decimal_log_softmax(row)
    with localcontext() as ctx:
        ctx.prec = 60
        return min(sum(v.exp() * (v - Decimal(t)) for v, t in zip(logp, template))
                   for template in log_templates.tolist())


def _kl_fit(lead: float, num_classes: int = 10) -> list[Features]:
    """ID fit logits whose predicted class leads by about `lead` (sets how peaked the templates are)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, num_classes, generator=g)
    z[torch.arange(200), torch.arange(200) % num_classes] += lead
    return [Features(logits=z[:120]), Features(logits=z[120:])]


@pytest.mark.parametrize("lead, max_gap", [(3.0, 40.0), (6.0, 40.0), (40.0, 50.0)])
def test_kl_matching_keeps_confident_inputs_ranked_while_float64_can(lead, max_gap):
    """KL of a saturated p is the template term -log d_kc plus ~e^-gap: one float64 holds that sum
    while e^-gap * gap exceeds ~1e-16 * |log d_kc|. Ordinary templates (-log d_kc ~ 0.6 at lead 3,
    ~0.1 at lead 6) resolve gaps up to 40 (the first tie at ~41 and ~43); peaked ones (lead 40:
    -log d_kc ~ 2e-16) all of 20..50. Within that, scores are distinct and in the reference's order
    (which need not follow the gap: KL is smallest where p matches the template)."""
    scorer = scorers.get("kl_matching").fit(_kl_fit(lead))
    logits = _confident_logits(GAPS[GAPS <= max_gap])
    got = scorer.score(Features(logits=logits)).numpy()
    want = [_decimal_kl_matching(row, scorer.log_templates) for row in logits.double().tolist()]
    np.testing.assert_allclose(got, [float(w) for w in want], rtol=1e-14, atol=1e-30)
    assert len(np.unique(got)) == len(got), f"ties: {len(got) - len(np.unique(got))}"
    assert np.argsort(got).tolist() == sorted(range(len(want)), key=want.__getitem__)


def _np_mahalanobis(x_fit, y_fit, x_test):
    """Lee et al.: per-class means, shared covariance (MLE), min over classes of the distance."""
    classes = np.unique(y_fit)
    means = np.stack([x_fit[y_fit == c].mean(0) for c in classes])
    centred = x_fit - means[np.searchsorted(classes, y_fit)]
    cov = centred.T @ centred / len(x_fit)
    prec = np.linalg.pinv(cov)
    d = np.stack([np.einsum("nd,de,ne->n", x_test - m, prec, x_test - m) for m in means], 1)
    return d.min(1)


def _gaussian_data(seed, n=90, d=6, k=3, offset=100.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g) * 3
    mix = torch.randn(d, d, generator=g)
    x = centres[labels] + torch.randn(n, d, generator=g) @ mix + offset  # correlated, far from 0
    return x, labels


def test_mahalanobis_matches_direct_computation_and_streaming_equals_one_batch():
    x, y = _gaussian_data(0)
    logits = torch.zeros(len(x), 3)
    x_test = _gaussian_data(1, n=11)[0] + torch.randn(11, 6)
    want = _np_mahalanobis(x.double().numpy(), y.numpy(), x_test.double().numpy())
    whole = Features(logits=logits, penultimate=x, labels=y)
    test = Features(logits=torch.zeros(11, 3), penultimate=x_test)
    one = scorers.get("mahalanobis", products="float64").fit([whole])
    many = scorers.get("mahalanobis", products="float64").fit(_split(whole, [7, 40, 1, 42]))
    got_one, got_many = one.score(test).numpy(), many.score(test).numpy()
    np.testing.assert_allclose(got_one, want, rtol=1e-7)
    np.testing.assert_allclose(got_many, got_one, rtol=1e-9)
    # the fitted class means are the per-class sample means
    np.testing.assert_allclose(many.gaussians[0].class_means().numpy(),
                               np.stack([x[y == c].double().mean(0).numpy() for c in range(3)]), rtol=1e-12)
    # the default float32 products: the covariance's rounding (~1e-7) amplified by its condition (~500 here)
    for batches in ([whole], _split(whole, [7, 40, 1, 42])):
        fast = scorers.get("mahalanobis").fit(batches).score(test).numpy()
        np.testing.assert_allclose(fast, want, rtol=1e-4)
        assert (np.argsort(fast) == np.argsort(want)).all()


def test_mahalanobis_on_a_singular_covariance_is_pinvs_distance():
    # a repeated feature column: Cholesky fails, the eigen whitening keeps pinv's quadratic form
    x, y = _gaussian_data(6)
    x = torch.cat([x, x[:, :1]], 1)
    x_test = _gaussian_data(7, n=11)[0]
    x_test = torch.cat([x_test, x_test[:, :1]], 1)
    want = _np_mahalanobis(x.double().numpy(), y.numpy(), x_test.double().numpy())
    scorer = scorers.get("mahalanobis", products="float64")
    scorer.fit([Features(logits=torch.zeros(len(x), 3), penultimate=x, labels=y)])
    assert not scorer.gaussians[0].whitening.triangular
    got = scorer.score(Features(logits=torch.zeros(11, 3), penultimate=x_test)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mahalanobis_blocks_sum_the_per_block_minimal_distances():
    (a, y), (b, _) = _gaussian_data(2, d=4), _gaussian_data(3, d=5)
    a_test, b_test = _gaussian_data(4, n=9, d=4)[0], _gaussian_data(5, n=9, d=5)[0]
    maps = [a.view(len(a), 4, 1, 1).expand(-1, -1, 2, 2), b]  # a raw map is pooled, a pooled one kept
    fit = Features(logits=torch.zeros(len(a), 3), penultimate=None, blocks=maps, labels=y)
    scorer = scorers.get("mahalanobis", use_blocks=True, products="float64").fit(_split(fit, [45, 45]))
    got = scorer.score(Features(logits=torch.zeros(9, 3), blocks=[a_test, b_test])).numpy()
    want = sum(_np_mahalanobis(u.double().numpy(), y.numpy(), v.double().numpy())
               for u, v in [(a, a_test), (b, b_test)])
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_gram_block_features_hand_case():
    fmap = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, HW=2
    got = gram_block_features(fmap, 2)
    # p=1: G=[[5,11],[11,25]] -> rows [16,36]; p=2: F^2=[[1,4],[9,16]], G=[[17,73],[73,337]] -> sqrt([90,410])
    want = torch.tensor([[[16.0, 36.0], [math.sqrt(90), math.sqrt(410)]]])
    assert got.shape == (1, 2, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    # against explicit Gram matrices (signed root of the row sums), incl. negative activations and p=3
    fmap = torch.randn(3, 4, 3, 2, generator=torch.Generator().manual_seed(0))
    f = fmap.double().flatten(2)
    for p in (1, 2, 3):
        rows = (f ** p @ (f ** p).transpose(1, 2)).sum(2)
        torch.testing.assert_close(gram_block_features(fmap, 3)[:, p - 1].double(),
                                   rows.sign() * rows.abs() ** (1 / p), rtol=1e-6, atol=1e-6)


def _gram_fit_features(values: list[list[float]], preds: list[int]) -> Features:
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 2).float()
    return Features(logits=logits, blocks=[torch.tensor(values).view(len(values), 1, -1)])


def test_gram_deviation_hand_case_and_streaming():
    # sample 0 is held out (running index 0); samples 1..3 set min/max per predicted class
    values = [[4.0, 2.0], [1.0, 2.0], [3.0, 4.0], [10.0, 10.0]]
    preds = [0, 0, 0, 1]
    fit = _gram_fit_features(values, preds)
    scorer = scorers.get("gram", powers=1).fit([fit])
    # class 0: min [1,2], max [3,4]; held-out [4,2] deviates (4-3)/3 -> normalizer 1/3
    assert scorer.normalizer[0].item() == pytest.approx(1 / (3 + 1e-6), rel=1e-9)
    test = _gram_fit_features([[0.0, 6.0], [2.0, 3.0], [5.0, 12.0]], [0, 0, 1])
    dev0 = (1 - 0) / (1 + 1e-6) + (6 - 4) / (4 + 1e-6)
    dev2 = (10 - 5) / (10 + 1e-6) + (12 - 10) / (10 + 1e-6)
    want = np.array([dev0, 0.0, dev2]) / (1 / (3 + 1e-6))
    np.testing.assert_allclose(scorer.score(test).numpy(), want, rtol=1e-9)
    # batch boundaries change nothing (min/max and the held-out choice are order-based)
    streamed = scorers.get("gram", powers=1).fit(_split(fit, [1, 2, 1]))
    np.testing.assert_allclose(streamed.score(test).numpy(), want, rtol=1e-9)


def test_gram_sums_normalized_blocks_and_unseen_class_uses_all_classes():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.rand(50, 2, 3, generator=g) + 1, torch.rand(50, 2, 4, generator=g) + 1]
    logits = torch.zeros(50, 3)
    logits[torch.arange(50), torch.arange(50) % 2] = 1  # class 2 never predicted
    scorer = scorers.get("gram", powers=2, holdout_every=5).fit([Features(logits=logits, blocks=blocks)])
    keep = torch.arange(50) % 5 != 0
    test_blocks = [torch.rand(6, 2, 3, generator=g) * 3, torch.rand(6, 2, 4, generator=g) * 3]
    test_pred = torch.tensor([0, 1, 2, 0, 1, 2])
    want = np.zeros(6)
    for b, (fit_v, v) in enumerate(zip(blocks, test_blocks)):
        def dev(values, pred):
            out = []
            for x, c in zip(values.double().numpy(), pred.tolist()):
                sel = keep & (torch.arange(50) % 2 == c) if c < 2 else keep
                lo, hi = fit_v[sel].double().numpy().min(0), fit_v[sel].double().numpy().max(0)
                below, above = np.maximum(lo - x, 0), np.maximum(x - hi, 0)
                out.append((below / np.abs(lo + 1e-6) + above / np.abs(hi + 1e-6)).sum())
            return np.array(out)
        held = ~keep
        norm = dev(fit_v[held], (torch.arange(50) % 2)[held]).mean()
        assert norm > 0
        want += dev(v, test_pred) / norm
    got = scorer.score(Features(logits=torch.nn.functional.one_hot(test_pred, 3).float(), blocks=test_blocks))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def _np_vim(w, b, x_fit, logit_fit, x_test, logit_test, dim):
    """The official ViM code (haoqiwang/vim), in numpy."""
    u = -np.linalg.pinv(w) @ b
    cov = (x_fit - u).T @ (x_fit - u) / len(x_fit)  # EmpiricalCovariance(assume_centered=True)
    eig_vals, eigen_vectors = np.linalg.eig(cov)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    vlogit_fit = np.linalg.norm((x_fit - u) @ ns, axis=-1)
    alpha = logit_fit.max(-1).mean() / vlogit_fit.mean()
    vlogit = np.linalg.norm((x_test - u) @ ns, axis=-1) * alpha
    energy = _np_lse(logit_test)
    return -(energy - vlogit)  # ViM score is energy - vlogit; higher = OOD is its negation


@pytest.mark.parametrize("dim", [None, 2])
def test_vim_matches_official_computation(dim):
    g = torch.Generator().manual_seed(0)
    d, c = 8, 3
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    scales = torch.tensor([5.0, 4, 3, 2.5, 2, 1.5, 1, 0.5])  # distinct variances: a well-defined subspace
    x = torch.randn(120, d, generator=g) * scales + 1
    x_test = torch.randn(9, d, generator=g) * 2
    logits, logits_test = x @ w.T + b, x_test @ w.T + b
    want = None
    for products, rtol in (("float64", 1e-8), ("float32", 1e-5)):
        scorer = scorers.get("vim", dim=dim, products=products, weight=w, bias=b)
        scorer.fit(_split(Features(logits=logits, penultimate=x), [50, 70]))
        assert scorer.principal_dim == (d // 2 if dim is None else dim)
        got = scorer.score(Features(logits=logits_test, penultimate=x_test)).numpy()
        if want is None:
            want = _np_vim(w.double().numpy(), b.double().numpy(), x.double().numpy(), logits.double().numpy(),
                           x_test.double().numpy(), logits_test.double().numpy(), scorer.principal_dim)
        np.testing.assert_allclose(got, want, rtol=rtol)


def test_vim_default_dim_rule():
    assert [scorers.vim_default_dim(w) for w in (4096, 2048, 2047, 768, 767, 512)] == [1000, 1000, 512, 512, 383, 256]


def test_react_matches_formula_with_known_percentile():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    b = torch.tensor([0.5, -0.5])
    fit = Features(logits=torch.zeros(4, 2), penultimate=torch.arange(1.0, 13.0).view(4, 3))
    scorer = scorers.get("react", weight=w, bias=b).fit(_split(fit, [1, 3]))
    # 90th percentile of 1..12 (numpy linear): 1 + 0.9 * 11 = 10.9
    assert scorer.threshold == pytest.approx(10.9) == pytest.approx(np.percentile(np.arange(1, 13), 90))
    h = torch.tensor([[20.0, 1.0, 3.0], [0.0, 11.0, 10.0]], dtype=torch.float64)
    got = scorer.score(Features(logits=torch.zeros(2, 2), penultimate=h))
    clipped = np.array([[10.9, 1, 3], [0, 10.9, 10]])
    z = clipped @ w.double().numpy().T + b.double().numpy()
    np.testing.assert_allclose(got.numpy(), -_np_lse(z), rtol=1e-12)
    assert scorers.get("react", percentile=50, weight=w, bias=b).fit([fit]).threshold == pytest.approx(6.5)


def test_react_reservoir_estimates_the_percentile_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(400, 250, generator=g)  # 100k values, uniform on [0, 1): true p90 ~ 0.9
    batches = _split(Features(logits=torch.zeros(400, 2), penultimate=h), [100] * 4)
    w = torch.randn(2, 250, generator=g)
    fitted = [scorers.get("react", reservoir_size=20_000, seed=s, weight=w).fit(batches).threshold for s in (0, 0, 1)]
    exact = float(np.percentile(h.numpy(), 90))
    assert abs(fitted[0] - exact) < 0.01 and abs(fitted[2] - exact) < 0.01
    assert fitted[0] == fitted[1] != fitted[2]


def test_the_reservoir_is_a_uniform_sample_and_accounts_for_every_row():
    # every row ends in the sample or is handed back exactly once (Gram folds those into its min/max)
    sample = Reservoir(100, seed=0)
    handed_back = []
    for start in range(0, 5000, 700):
        rows = torch.arange(start, min(start + 700, 5000))
        kept, (evicted,) = sample.add(rows)
        handed_back += [rows[~kept], evicted]
    assert len(sample) == 100
    assert torch.equal(torch.cat([sample.columns[0], *handed_back]).sort().values, torch.arange(5000))
    # uniform: each of 10 000 rows is in a 500-row sample with probability 0.05, early rows as late ones
    hits = torch.zeros(10_000)
    for seed in range(40):
        sample = Reservoir(500, seed)
        for start in range(0, 10_000, 1024):
            sample.add(torch.arange(start, min(start + 1024, 10_000)), report=False)
        hits[sample.columns[0]] += 1
    per_decile = hits.view(10, 1000).sum(1) / (40 * 1000)
    assert ((per_decile - 0.05).abs() < 0.006).all(), per_decile  # 5 sigma of a decile's mean
    # exact while the stream fits: the whole stream, in order
    small = Reservoir(64, seed=3)
    small.add(torch.arange(40), report=False)
    small.add(torch.arange(40, 64), report=False)
    assert torch.equal(small.columns[0], torch.arange(64))


@pytest.mark.parametrize("name", scorers.names())
def test_scorers_fit_and_score_without_copying_to_the_host(name, monkeypatch):
    """On a GPU the fit never copies the fit set to the host: no scorer calls .cpu() or .tolist()
    while fitting or scoring (checked on CPU tensors, where the calls would be no-ops; .numpy(), a
    view on the CPU and an error on a GPU tensor, is used for CPU-only LAPACK calls)."""
    w = torch.cat([torch.eye(4), torch.zeros(4, 12)], 1)
    scorer = _build(name, {}, torch.nn.Linear(16, 4))
    if scorer.needs_classifier:
        scorer.set_classifier(w, torch.zeros(4))
    fit = _separable_features(0, 200, False, w)
    if scorer.needs_blocks:
        fit.blocks = [scorer.reduce_block(m) for m in fit.blocks]
    if scorer.reads_extra_outputs:
        fit.logits = torch.cat([fit.logits, fit.penultimate[:, 8:].sum(1, keepdim=True)], 1)

    def host_copy(*args, **kwargs):
        raise AssertionError(f"scorer {name!r} copies a tensor to the host")

    for method in ("cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, host_copy)
    scorer.fit(_split(fit, [120, 80]))
    assert scorer.score(fit).shape == (200,)


def test_products_is_a_checked_choice():
    with pytest.raises(ValueError, match="products='float16': choose one of float32, float64"):
        scorers.get("mahalanobis", products="float16")


# ----------------------------------------------------------------------------- 3. higher = more OOD

def _separable_features(seed: int, n: int, ood: bool, w: torch.Tensor) -> Features:
    """ID: dense positive activations in dims 0..7 plus a class spike in dim c < 4 (peaked logits).
    OOD: small in the class directions (near-uniform logits), large in dims 8.. that ID leaves unused."""
    g = torch.Generator().manual_seed(seed)
    d = w.shape[1]
    labels = torch.arange(n) % w.shape[0]
    h = 0.1 * torch.randn(n, d, generator=g)
    if ood:
        h[:, 8:] += 3 * torch.randn(n, d - 8, generator=g).abs()
    else:
        h[:, :8] += 1
        h[:, :4] += 5 * torch.nn.functional.one_hot(labels, 4)
    blocks = [h.abs().view(n, d, 1, 1)]
    return Features(logits=h @ w.T, penultimate=h, blocks=blocks, labels=labels)


@pytest.mark.parametrize("name", scorers.names())
def test_ood_scores_higher(name):
    w = torch.cat([torch.eye(4), torch.zeros(4, 12)], 1)  # 4 classes read the first 4 of 16 dims
    scorer = _build(name, {}, torch.nn.Linear(16, 4))
    if scorer.needs_classifier:
        scorer.set_classifier(w, torch.zeros(4))

    def prepare(f: Features) -> Features:
        if scorer.needs_blocks:
            f.blocks = [scorer.reduce_block(m) for m in f.blocks]
        if scorer.reads_extra_outputs:  # an (N+1)-th OOD output (CMG-softmax) that reads the OOD dims
            f.logits = torch.cat([f.logits, f.penultimate[:, 8:].sum(1, keepdim=True)], 1)
        return f

    scorer.fit([prepare(_separable_features(0, 200, False, w))])
    s_id = scorer.score(prepare(_separable_features(1, 50, False, w)))
    s_ood = scorer.score(prepare(_separable_features(2, 50, True, w)))
    assert s_ood.min() > s_id.max(), f"{name}: OOD min {s_ood.min():.4g} <= ID max {s_id.max():.4g}"


# ----------------------------------------------------------------------------- 4. errors

def test_unknown_scorer_lists_valid_names():
    with pytest.raises(KeyError) as err:
        scorers.get("mahalanobsi")
    assert isinstance(err.value, ValueError)
    assert "unknown scorer 'mahalanobsi'" in str(err.value)
    for name in scorers.names():
        assert name in str(err.value)


def test_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"'odin' has no hyper-parameter 'T'.*temperature=1000\.0, epsilon=0\.0"):
        scorers.get("odin", T=1000)
    with pytest.raises(ValueError, match="'msp' has no hyper-parameter 'temperature'; accepted .*: none"):
        scorers.get("msp", temperature=2)
    assert scorers.get("energy", temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError, match="temperature=0"):
        scorers.get("energy", temperature=0)


NEEDS_FIT = [n for n in scorers.names() if scorers.SCORERS[n].needs_fit]


@pytest.mark.parametrize("name", NEEDS_FIT)
def test_score_before_fit_is_an_error(name):
    assert {"kl_matching", "mahalanobis", "gram", "vim", "react"} <= set(NEEDS_FIT)
    scorer = _build(name, {}, torch.nn.Linear(4, 3))
    f = Features(logits=torch.zeros(2, 3), penultimate=torch.zeros(2, 4), blocks=[torch.zeros(2, 10, 4)])
    with pytest.raises(RuntimeError, match=f"scorer '{name}' needs fitting on the ID training split first"):
        scorer.score(f)


def test_other_usage_errors():
    with pytest.raises(ValueError, match="needs the ID training labels"):
        scorers.get("mahalanobis").fit([Features(logits=torch.zeros(3, 2), penultimate=torch.zeros(3, 4))])
    with pytest.raises(RuntimeError, match="needs the classifier's weight and bias"):
        scorers.get("vim").fit([Features(logits=torch.zeros(3, 2), penultimate=torch.zeros(3, 4))])
    with pytest.raises(ValueError, match="needs per-block features"):
        scorers.get("gram").fit([Features(logits=torch.zeros(3, 2))])
    one_shot = iter([Features(logits=torch.zeros(3, 2), penultimate=torch.zeros(3, 4))])
    with pytest.raises(TypeError, match="2 passes"):
        scorers.get("vim", weight=torch.ones(2, 4)).fit(one_shot)
    with pytest.raises(ValueError, match="already registered"):
        scorers.register("msp")(scorers.MSP)


def test_streaming_protocol_by_hand_equals_fit():
    w = torch.cat([torch.eye(4), torch.zeros(4, 12)], 1)
    data = [_separable_features(s, 30, False, w) for s in range(3)]
    by_fit = scorers.get("vim", weight=w).fit(lambda: iter(data))
    by_hand = scorers.get("vim", weight=w)
    for _ in range(by_hand.fit_passes):
        assert not by_hand.is_fitted
        for f in data:
            by_hand.fit_batch(f)
        by_hand.fit_end()
    assert by_hand.is_fitted
    with pytest.raises(RuntimeError, match="already fitted"):
        by_hand.fit_batch(data[0])
    test = _separable_features(9, 5, True, w)
    torch.testing.assert_close(by_hand.score(test), by_fit.score(test))


# ----------------------------------------------------------------------------- 5. input preprocessing

def _linear_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)))
        model[1].bias.zero_()
    return model.eval()


def test_odin_perturbation_increases_max_softmax():
    model = _linear_model()
    forward = lambda x: Features(logits=model(x))  # noqa: E731
    x = model[1].weight[2].detach().view(1, 3, 2, 2) * 0.5  # ID-like: clearly class 2
    for temperature in (1.0, 1000.0):
        scorer = scorers.get("odin", temperature=temperature, epsilon=0.01)
        assert scorer.needs_input_grad and not scorers.get("odin").needs_input_grad
        x_pert = scorer.perturb(forward, x)
        assert x_pert.shape == x.shape and (x_pert - x).abs().max().item() == pytest.approx(0.01)
        msp_before = torch.softmax(model(x) / temperature, 1).max().item()
        msp_after = torch.softmax(model(x_pert) / temperature, 1).max().item()
        assert msp_after > msp_before
        assert scorer.score(forward(x_pert)).item() < scorer.score(forward(x)).item()
    assert model[1].weight.grad is None  # only the input got a gradient
    assert torch.equal(input_perturbation(forward, x, scorers.get("msp").score, 0.0), x)


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_odin_gradient_has_the_papers_sign_also_when_saturated(temperature):
    """ODIN steps along sign(grad_x score). The paper's step is along sign(grad_x -log S), with
    grad_x -log S = (1/T) sum_{j != c} p_j (w_j - w_c) for logits W x; our log(1 - S) has a positive
    multiple of it, so the same sign, also where the softmax saturates (-S's gradient rounds to 0)."""
    model = _linear_model()
    w = model[1].weight.detach().double()
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    x[3:] = model[1].weight[:3].detach().view(3, 3, 2, 2) * 6 * temperature  # confident: class 0, 1, 2
    logits = model(x).detach().double() / temperature
    top = logits.argmax(1)
    gaps = logits.amax(1) - logits.scatter(1, top[:, None], -math.inf).amax(1)
    assert (gaps[3:] > 20).all() and (gaps[:3] < 5).all()
    p = torch.softmax(logits, 1).scatter(1, top[:, None], 0.0)  # p_j, j != c: exact also when saturated
    paper = torch.einsum("nj,njd->nd", p, w[None] - w[top][:, None]) / temperature

    xg = x.clone().requires_grad_(True)
    score = scorers.get("odin", temperature=temperature).score(Features(logits=model(xg)))
    (ours,) = torch.autograd.grad(score.sum(), xg)
    assert torch.equal(ours.flatten(1).sign(), paper.sign().float())


def test_mahalanobis_perturbation_decreases_distance():
    model = _linear_model()
    x_fit = torch.randn(60, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    forward = lambda x: Features(logits=model(x), penultimate=model(x))  # noqa: E731
    with torch.no_grad():
        fit = forward(x_fit)
    fit.labels = fit.logits.argmax(1)
    scorer = scorers.get("mahalanobis", epsilon=0.005).fit([fit])
    x = x_fit[:5] * 1.5
    x_pert = scorer.perturb(forward, x)
    assert (scorer.score(forward(x_pert)) < scorer.score(forward(x))).all()


def test_scoring_in_chunks_equals_scoring_at_once(monkeypatch):
    g = torch.Generator().manual_seed(3)
    fit = Features(logits=torch.randn(40, 3, generator=g), penultimate=torch.randn(40, 6, generator=g),
                   labels=torch.arange(40) % 3)
    test = Features(logits=torch.randn(10, 3, generator=g), penultimate=torch.randn(10, 6, generator=g))
    scorer = scorers.get("mahalanobis").fit([fit])
    whole = scorer.score(test)
    monkeypatch.setattr(scorers.Mahalanobis, "score_chunk", 3)
    chunked = scorer.score(test)  # float32 triangular solves of 3 rows or 10: the same up to their rounding
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    assert not torch.equal(chunked[:3], scorer.score(test.rows(slice(3, 6))))
