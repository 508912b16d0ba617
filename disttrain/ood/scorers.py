"""Post-hoc OOD scorers: one registry, each scorer a small fit/score contract.

Convention: `score(features)` returns one float64 OOD score per sample, HIGHER = MORE LIKELY OOD
(energy -T*logsumexp(logits/T), Mahalanobis the distance, ...). Where the paper's own quantity
cannot rank confident inputs in float64 (MSP's -max softmax is exactly -1.0 for every saturated
input, a tie), the scorer stores a rank-equivalent statistic instead (MSP: log(1 - max softmax)):
the metrics are those of the paper's score, and `paper_score(scores)` maps stored scores back.

Contract of a scorer (`Scorer`):
  * class/instance flags tell the feature extractor what to compute: `needs_fit`, `fit_passes`,
    `needs_labels` (fit uses the true ID labels), `needs_penultimate`, `needs_blocks` with
    `block_features` ("pooled": global-average-pooled block maps [N, C_b]; "gram": Gram row-sum
    features [N, powers, C_b] from `gram_block_features`; `reduce_block(map)` computes either),
    `needs_classifier` (call `set_classifier(weight, bias)`), `needs_input_grad` (input
    preprocessing: run `perturb(model_forward, images)` and score the perturbed inputs' features).
  * streaming fit on the ID training split, batch by batch (nothing of size N x D is kept):
        for _ in range(scorer.fit_passes):
            for batch in id_train: scorer.fit_batch(features_of(batch))
            scorer.fit_end()
    or `scorer.fit(batches)` with a re-iterable (list, DataLoader-backed iterable) or a zero-argument
    callable returning a fresh iterable per pass. Only ViM takes two passes.
  * `score(features)` on any batch; scorers with ID statistics raise RuntimeError before fitting.

`SCORERS` is the registry (filled by `@register(name)`); `get(name, **hyperparams)` builds one,
`names()` lists them. Learned heads (an nn.Module inside a Scorer) plug in the same way.
"""

from __future__ import annotations

import inspect
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BlockKind = Literal["pooled", "gram"]
ScoreArray = TypeVar("ScoreArray", Tensor, np.ndarray)  # stored scores as returned, or as saved (scores.npz)
SCORE_CHUNK = 8192  # rows scored at once; Mahalanobis/ViM make float64 copies of N x D per call

__all__ = [
    "Features", "Scorer", "ClassifierScorer", "SCORERS", "register", "get", "names", "UnknownScorerError",
    "input_perturbation", "gram_block_features", "pooled_block_features",
]


@dataclass
class Features:
    """What one forward pass over a batch produced.

    logits: [N, C]. penultimate: [N, D] pre-logits features. blocks: per residual block, the reduced
    block features the scorer asked for (`Scorer.block_features`), or None. labels: [N] true labels
    (needed to fit class-conditional scorers such as Mahalanobis), or None."""

    logits: Tensor
    penultimate: Tensor | None = None
    blocks: list[Tensor] | None = None
    labels: Tensor | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def rows(self, index: Tensor | slice) -> "Features":
        """The same fields for the samples `index` selects."""
        return Features(
            logits=self.logits[index],
            penultimate=None if self.penultimate is None else self.penultimate[index],
            blocks=None if self.blocks is None else [b[index] for b in self.blocks],
            labels=None if self.labels is None else self.labels[index])


FitData = Union[Iterable[Features], Callable[[], Iterable[Features]]]


# ----------------------------------------------------------------------------- block features

def pooled_block_features(feature_map: Tensor) -> Tensor:
    """Global average pool of a block's feature map [N, C, H, W] -> [N, C] (Mahalanobis)."""
    return feature_map.flatten(2).mean(2) if feature_map.dim() > 2 else feature_map


def gram_block_features(feature_map: Tensor, powers: int) -> Tensor:
    """Sastry & Oore (2020) Gram features of one block: [N, C, H, W] -> [N, powers, C] (float32).

    For p = 1..powers: F_p = F**p (elementwise, F as [C, H*W]), row sums of F_p F_p^T, then the
    signed p-th root. This is the official implementation's order (row sums of the Gram matrix,
    then the root: `G_p` in github.com/VectorInstitute/gram-ood-detection); the paper writes
    (F^p F^p^T)^(1/p). The row sums are computed as F_p @ (F_p^T 1), O(C*HW) instead of
    O(C^2*HW), in float64 (F**10 overflows float32 for activations above ~80)."""
    if powers < 1:
        raise ValueError(f"powers={powers} must be >= 1")
    f = feature_map.detach().to(torch.float64).flatten(2)  # [N, C, HW]
    out = []
    for p in range(1, powers + 1):
        fp = f.pow(p)
        rows = (fp * fp.sum(1, keepdim=True)).sum(2)  # [N, C]: sum_j (F_p F_p^T)[i, j]
        out.append(rows.sign() * rows.abs().pow(1.0 / p))
    return torch.stack(out, 1).float()


# ----------------------------------------------------------------------------- input preprocessing

def input_perturbation(model_forward: Callable[[Tensor], Any], images: Tensor,
                       score_fn: Callable[[Any], Tensor], epsilon: float) -> Tensor:
    """ODIN / Mahalanobis input preprocessing: x' = x - epsilon * sign(grad_x score(x)).

    `model_forward(x)` returns what `score_fn` takes (e.g. a `Features`), `score_fn` returns the
    per-sample OOD score (higher = OOD, e.g. `scorer.score`). Stepping against the score's
    gradient lowers the score, i.e. makes the input look more ID, which is the original
    papers' direction: ODIN (Liang et al. 2018) steps to INCREASE the temperature-scaled
    max softmax (x - eps*sign(-grad log S_yhat(x; T))); our ODIN score is log(1 - S_yhat(x; T))
    and, per sample, grad log(1 - S) = -grad S / (1 - S) = -(S / (1 - S)) grad log S: the same sign
    (and, unlike grad(-S), not rounded to 0 when S saturates). Mahalanobis (Lee et al. 2018) steps to DECREASE
    the distance to the closest class Gaussian; our score is that distance. With blocks, the
    step follows the gradient of the summed score (the original perturbs per layer).

    The model must be in eval mode (per-sample independence: the gradient of the batch sum is
    the per-sample gradient). `epsilon` is in the model's input space (normalized pixels; the
    original ODIN code additionally divides the gradient by the per-channel std). Only the
    input gets a gradient; the model's parameter grads are untouched."""
    if epsilon == 0:
        return images
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0")
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = score_fn(model_forward(x))
        (grad,) = torch.autograd.grad(score.sum(), x)
    return (x - epsilon * grad.sign()).detach()


# ----------------------------------------------------------------------------- base class, registry

class Scorer:
    """Base class. Subclasses set their hyper-parameters (keyword-only `__init__` arguments), then
    call `super().__init__()`, and implement `_score` (and `_reset_stats`, `_fit_batch`, `_fit_end`
    when `needs_fit`)."""

    name: ClassVar[str] = "?"  # set by @register
    needs_fit: ClassVar[bool] = False
    fit_passes: ClassVar[int] = 1
    needs_labels: ClassVar[bool] = False
    needs_penultimate: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    reads_extra_outputs: ClassVar[bool] = False  # sees outputs beyond the ID classes' logits (CMG-softmax)
    # may depend on hyper-parameters, so instances may override these three:
    needs_blocks: bool = False
    block_features: BlockKind | None = None
    needs_input_grad: bool = False

    def __init__(self) -> None:
        self.reset()

    # -- introspection
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Accepted hyper-parameters and their defaults (the keyword-only `__init__` arguments)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        """The paper's score (higher = OOD) from stored `score` values, same ranking. Identity unless
        the scorer stores a rank-equivalent transform of it (MSP, ODIN, ood_class: see their docs)."""
        return scores

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k, '?')!r}" for k in self.hyperparameters()
                       if not isinstance(getattr(self, k, None), Tensor))
        return f"{type(self).__name__}({hp})"

    # -- fitting
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def reset(self) -> None:
        """Forget all fitted statistics (hyper-parameters and the classifier are kept)."""
        self._pass = 0
        self._fitted = not self.needs_fit
        self._reset_stats()

    def fit_batch(self, features: Features) -> None:
        """Accumulate one batch of ID training features into the current pass's statistics."""
        if not self.needs_fit:
            return
        if self._fitted:
            raise RuntimeError(f"scorer {self.name!r} is already fitted; call reset() to fit it again")
        self._check(features, fitting=True)
        with torch.no_grad():
            self._fit_batch(features, self._pass)

    def fit_end(self) -> None:
        """Finish the current pass (the last one finalizes the statistics)."""
        if not self.needs_fit:
            return
        if self._fitted:
            raise RuntimeError(f"scorer {self.name!r} is already fitted; call reset() to fit it again")
        with torch.no_grad():
            self._fit_end(self._pass)
        self._pass += 1
        self._fitted = self._pass == self.fit_passes

    def fit(self, data: FitData) -> "Scorer":
        """Reset, then run `fit_passes` passes over `data`: a re-iterable of `Features` or a
        zero-argument callable returning a fresh iterable per pass."""
        if not self.needs_fit:
            return self
        self.reset()
        for _ in range(self.fit_passes):
            batches = data() if callable(data) else data
            if self.fit_passes > 1 and not callable(data) and iter(batches) is batches:
                raise TypeError(f"scorer {self.name!r} fits in {self.fit_passes} passes: pass a re-iterable "
                                f"(list, loader-backed iterable) or a callable returning a fresh iterable, "
                                f"not a one-shot iterator")
            for features in batches:
                self.fit_batch(features)
            self.fit_end()
        return self

    # -- scoring
    def score(self, features: Features) -> Tensor:
        """OOD score per sample, float64 [N], higher = more OOD. Differentiable w.r.t. the
        features (input preprocessing relies on it)."""
        if not self._fitted:
            raise RuntimeError(f"scorer {self.name!r} needs fitting on the ID training split first "
                               f"(fit(batches), or fit_batch()/fit_end() for {self.fit_passes} pass(es))")
        self._check(features, fitting=False)
        if len(features) > SCORE_CHUNK:  # per-sample scores: chunks bound the float64 intermediates
            return torch.cat([self.score(features.rows(slice(i, i + SCORE_CHUNK)))
                              for i in range(0, len(features), SCORE_CHUNK)])
        scores = self._score(features).to(torch.float64)
        if scores.shape != (len(features),):
            raise AssertionError(f"scorer {self.name!r} returned shape {tuple(scores.shape)} "
                                 f"for {len(features)} samples")
        return scores

    def perturb(self, model_forward: Callable[[Tensor], Any], images: Tensor) -> Tensor:
        """Input preprocessing with this scorer's `epsilon` (identity when it needs none)."""
        if not self.needs_input_grad:
            return images
        return input_perturbation(model_forward, images, self.score, float(getattr(self, "epsilon")))

    def reduce_block(self, feature_map: Tensor) -> Tensor:
        """What this scorer wants in `Features.blocks` for one block's raw map [N, C, H, W]."""
        if self.block_features == "pooled":
            return pooled_block_features(feature_map)
        if self.block_features == "gram":
            return gram_block_features(feature_map, int(getattr(self, "powers")))
        raise RuntimeError(f"scorer {self.name!r} uses no block features")

    # -- for subclasses
    def _reset_stats(self) -> None:
        pass

    def _fit_batch(self, features: Features, pass_index: int) -> None:
        raise NotImplementedError

    def _fit_end(self, pass_index: int) -> None:
        raise NotImplementedError

    def _score(self, features: Features) -> Tensor:
        raise NotImplementedError

    def _check(self, features: Features, fitting: bool) -> None:
        if fitting and self.needs_labels and features.labels is None:
            raise ValueError(f"scorer {self.name!r} fits class-conditional statistics and needs the ID "
                             f"training labels in Features.labels")
        if self.needs_penultimate and features.penultimate is None:
            raise ValueError(f"scorer {self.name!r} needs penultimate features in Features.penultimate")
        if self.needs_blocks and not features.blocks:
            raise ValueError(f"scorer {self.name!r} needs per-block features in Features.blocks "
                             f"(block_features={self.block_features!r}; see Scorer.reduce_block)")


SCORERS: dict[str, type[Scorer]] = {}


class UnknownScorerError(KeyError, ValueError):
    """An unknown scorer name (a KeyError for registry look-ups, a ValueError for config checks)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: `@register("msp")` adds the scorer to `SCORERS` under `name`."""

    def deco(cls: type[Scorer]) -> type[Scorer]:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered ({SCORERS[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"@register({name!r}) needs a Scorer subclass, got {cls!r}")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered scorer names, in registration order."""
    return list(SCORERS)


def get(name: str, **hyperparams: Any) -> Scorer:
    """A new scorer by registry name; unknown names and hyper-parameters are errors that list
    what is accepted."""
    if name not in SCORERS:
        raise UnknownScorerError(f"unknown scorer {name!r}; registered scorers: {', '.join(names())}")
    cls = SCORERS[name]
    accepted = cls.hyperparameters()
    unknown = [k for k in hyperparams if k not in accepted]
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ValueError(f"scorer {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                         f"accepted (with defaults): {listed}")
    return cls(**hyperparams)


def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def _native(t: Tensor) -> Tensor:
    """Logit-level scores are computed in the features' own precision (float32 from the extractor;
    bf16/fp16 widened to float32): a float64 copy of 200 000 x 2048 features costs 3 GiB and time,
    for no gain in the ranking. Statistics that accumulate (covariances, sums) stay float64, and so
    do softmax-based scores (`_log_softmax64`: a float32 softmax saturates)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _log_softmax64(logits: Tensor) -> tuple[Tensor, Tensor]:
    """log softmax [N, C] and log(1 - max softmax) [N], in float64, exact for saturated inputs.

    With c = argmax and r = log sum_{j != c} exp(z_j - z_c) (a logsumexp: no underflow):
        log p_j = z_j - z_c - log1p(e^r),    log(1 - p_c) = r - log1p(e^r).
    A float32 softmax is exactly 1.0 once the runner-up trails by ~17 (float64: ~37), and torch's
    log_softmax forms 1 + e^r before its log, so log p_c = 0 there; here log p_c = -e^r to full
    precision and 1 - p_c is never formed. Differentiable (the argmax's own term is masked with
    -inf, which passes no gradient): ODIN's input preprocessing differentiates it."""
    z = _f64(logits)
    top = z.argmax(1, keepdim=True)
    shifted = z - z.gather(1, top)
    rest = torch.logsumexp(shifted.scatter(1, top, -math.inf), 1)  # log(1 - p_c) - log(p_c)
    log_norm = F.softplus(rest)  # log1p(e^r), exact for r << 0
    return shifted - log_norm[:, None], rest - log_norm


def _expm1(scores: ScoreArray) -> ScoreArray:
    return torch.expm1(scores) if isinstance(scores, Tensor) else np.expm1(scores)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name}={value} must be > 0")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if not value >= 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return float(value)


# ----------------------------------------------------------------------------- logit scorers

@register("msp")
class MSP(Scorer):
    """Hendrycks & Gimpel 2017: the paper's score is -max softmax probability. STORED: the
    rank-equivalent log(1 - max softmax) (float64, from the logits: `_log_softmax64`), so that
    confident inputs stay ranked: -max softmax is exactly -1.0 for every input whose runner-up
    logit trails by more than ~17 (float32) or ~37 (float64), and a quarter of a real ID test set
    tying there reads FPR95 = 100 %. Metrics are unchanged (same ranking); the scores saved to
    scores.npz are these log values: `confidence(scores)` = max softmax prob. = -expm1(score),
    `paper_score(scores)` = -max softmax = expm1(score)."""

    def _score(self, f: Features) -> Tensor:
        return _log_softmax64(f.logits)[1]

    @classmethod
    def confidence(cls, scores: ScoreArray) -> ScoreArray:
        """The max softmax probability (in [0, 1]) of stored MSP scores: -expm1(score)."""
        return -_expm1(scores)

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        return -cls.confidence(scores)


@register("ood_class")
class OODClass(Scorer):
    """CMG-softmax (cmg.txt 3.3): the paper's score is the softmax probability p_{N+1} of a
    classifier's extra (N+1)-th OOD class. STORED: log p_{N+1} (float64 log-softmax of the logits,
    `_log_softmax64`): the probability underflows or rounds for confident inputs, its log does not.
    Same ranking, same metrics; `paper_score(scores)` = exp(score) = p_{N+1}.
    It reads every output; the other scorers are given the N ID logits only."""

    reads_extra_outputs: ClassVar[bool] = True

    def _score(self, f: Features) -> Tensor:
        return _log_softmax64(f.logits)[0][:, -1]

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        return scores.exp() if isinstance(scores, Tensor) else np.exp(scores)


@register("odin")
class ODIN(Scorer):
    """Liang et al. 2018: the paper's score is -max softmax(logits / T). STORED, as for MSP: the
    rank-equivalent log(1 - max softmax(logits / T)) in float64 (`paper_score` = expm1(score)).
    Input preprocessing with `epsilon` > 0 (`perturb`, see `input_perturbation`; it steps along
    the sign of this score's gradient, which is the paper's); mixupoe App. D.2 omits it
    (epsilon=0, the default)."""

    def __init__(self, *, temperature: float = 1000.0, epsilon: float = 0.0):
        self.temperature = _positive("temperature", temperature)
        self.epsilon = _non_negative("epsilon", epsilon)
        self.needs_input_grad = self.epsilon > 0
        super().__init__()

    def _score(self, f: Features) -> Tensor:
        return _log_softmax64(_f64(f.logits) / self.temperature)[1]

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        return _expm1(scores)


@register("energy")
class Energy(Scorer):
    """Liu et al. 2020: the free energy -T * logsumexp(logits / T)."""

    def __init__(self, *, temperature: float = 1.0):
        self.temperature = _positive("temperature", temperature)
        super().__init__()

    def _score(self, f: Features) -> Tensor:
        return -self.temperature * torch.logsumexp(_native(f.logits) / self.temperature, 1)


@register("maxlogit")
class MaxLogit(Scorer):
    """Hendrycks et al. 2022: -max logit."""

    def _score(self, f: Features) -> Tensor:
        return -_native(f.logits).amax(1)


@register("entropy")
class Entropy(Scorer):
    """Entropy of the softmax distribution, -sum p log p (nats), stored as such. Float64 from the
    logits (`_log_softmax64`): for a confident input every term is tiny but representable (the
    argmax's own -p_c log p_c = e^r too), so it stays ranked until the runners-up underflow
    (logit gaps of ~700)."""

    def _score(self, f: Features) -> Tensor:
        logp = _log_softmax64(f.logits)[0]
        return -(logp.exp() * logp).sum(1)


@register("kl_matching")
class KLMatching(Scorer):
    """Hendrycks et al. 2022 ("Scaling OOD detection"): templates d_k = mean softmax of the ID
    fit samples PREDICTED as class k; score = min_k KL(p(x) || d_k), stored as such. Classes
    never predicted during fit have no template and are left out of the min. Template entries
    are clamped at the smallest positive float64 before the log.

    Float64 from the logits (`_log_softmax64`), split so that only the final sum rounds: with
    c = argmax p and S = 1 - p_c,
        KL(p || d_k) = -log d_kc + [-H(p) + S log d_kc - sum_{j != c} p_j log d_kj],
    the bracket ~ S * (log-ratios) computed to full relative precision. Limit: a saturated p
    (S ~ e^-gap for a logit gap) changes KL by ~S * gap on top of the template term -log d_kc,
    and one float64 holds that only while it exceeds ~1e-16 * |log d_kc|: ties begin at logit
    gaps of ~40-47 for template terms of 1-0.002 (tests/test_scorers.py: distinct and ordered up
    to 40 with terms 0.1-0.6, up to 50 with peaked templates). No float64 score can rank
    confident inputs beyond that: MSP and entropy can. The templates' own entry d_kk is kept as
    1 - mean(1 - p_k) (fit accumulates the non-max mass), so log d_kk stays exact when the fit
    data is confident too."""

    needs_fit = True

    def _reset_stats(self) -> None:
        self._sums: Tensor | None = None  # [C, C]: row k sums p over samples predicted k, but [k, k] sums 1 - p_k
        self._counts: Tensor | None = None

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        logp, log_rest = _log_softmax64(f.logits)
        pred = logp.argmax(1)
        # the predicted class's entry as 1 - p_k: its template entry 1 - mean(1 - p_k) keeps its log exact
        mass = logp.exp().scatter(1, pred[:, None], log_rest.exp()[:, None])
        if self._sums is None:
            k = mass.shape[1]
            self._sums = mass.new_zeros(k, k)
            self._counts = mass.new_zeros(k)
        self._sums.index_add_(0, pred, mass)
        self._counts.index_add_(0, pred, torch.ones_like(pred, dtype=torch.float64))

    def _fit_end(self, pass_index: int) -> None:
        if self._counts is None or self._counts.sum() == 0:
            raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
        seen = self._counts > 0
        templates = self._sums[seen] / self._counts[seen, None]  # [K_seen, C], own class: 1 - d_kk
        log_templates = templates.clamp_min(torch.finfo(torch.float64).tiny).log()
        rows, own = torch.arange(len(templates), device=templates.device), seen.nonzero().flatten()
        log_templates[rows, own] = torch.log1p(-templates[rows, own])
        self.log_templates = log_templates  # [K_seen, C]

    def _score(self, f: Features) -> Tensor:
        logp = _log_softmax64(f.logits)[0]
        p = logp.exp()
        top = logp.argmax(1)
        others = p.scatter(1, top[:, None], 0.0)  # p_j for j != c: 1 - p_c is never formed
        log_t = self.log_templates.to(p.device)  # [K_seen, C]
        log_t_top = log_t.T[top]  # [N, K_seen]: log d_kc
        small = ((p * logp).sum(1, keepdim=True) + others.sum(1, keepdim=True) * log_t_top
                 - others @ log_t.T)
        return (small - log_t_top).amin(1)


# ----------------------------------------------------------------------------- Mahalanobis

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
        x = _f64(x.detach())
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
        xc = _f64(x) - self.shift.to(x.device)
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
    needs_labels = True

    def __init__(self, *, use_blocks: bool = False, epsilon: float = 0.0):
        self.use_blocks = bool(use_blocks)
        self.epsilon = _non_negative("epsilon", epsilon)
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


# ----------------------------------------------------------------------------- Gram matrices

@register("gram")
class Gram(Scorer):
    """Sastry & Oore 2020, on the residual blocks' maps (mixupoe App. D.2).

    Features.blocks[b]: [N, powers, C_b] from `gram_block_features` (p = 1..powers; default 10,
    the original code's range(1, 11)). Fit, per PREDICTED class, per block: elementwise min and
    max over the ID fit samples. Deviation of a sample w.r.t. its predicted class:
        sum_{p,i} relu(min - v)/|min + 1e-6| + relu(v - max)/|max + 1e-6|   (official code's form),
    normalized per block by the mean deviation of held-out ID samples, summed over blocks.

    Held-out normalization (the original uses held-out ID validation data; deviations of the
    very samples that set min/max would be 0): in the single fit pass, every `holdout_every`-th
    sample (running index 0, k, 2k, ...) is a held-out candidate; a seeded reservoir keeps at
    most `holdout_size` of them apart, and every other sample (incl. candidates evicted from
    the reservoir) updates min/max. At fit_end the reservoir's mean deviation per block is the
    normalizer (a block whose held-out deviation is 0 gets normalizer 1, with a warning).
    Classes never predicted during fit use the min/max over all classes."""

    needs_fit = True
    needs_blocks = True
    block_features = "gram"
    EPS: ClassVar[float] = 1e-6

    def __init__(self, *, powers: int = 10, holdout_every: int = 10, holdout_size: int = 1000, seed: int = 0):
        if int(powers) < 1 or int(holdout_every) < 2 or int(holdout_size) < 1:
            raise ValueError(f"need powers >= 1, holdout_every >= 2, holdout_size >= 1; got "
                             f"powers={powers}, holdout_every={holdout_every}, holdout_size={holdout_size}")
        self.powers, self.holdout_every, self.holdout_size, self.seed = \
            int(powers), int(holdout_every), int(holdout_size), int(seed)
        super().__init__()

    def _reset_stats(self) -> None:
        self.mins: list[Tensor] | None = None
        self.maxs: list[Tensor] | None = None
        self._fitted_counts: Tensor | None = None
        self._seen = 0
        self._candidates = 0
        self._reservoir: list[tuple[int, list[Tensor]]] = []  # (pred, per-block [powers, C_b])
        self._rng = random.Random(self.seed)

    def _blocks(self, f: Features) -> list[Tensor]:
        for b in f.blocks:
            if b.dim() != 3 or b.shape[1] != self.powers:
                raise ValueError(f"scorer {self.name!r} (powers={self.powers}) needs blocks of shape "
                                 f"[N, {self.powers}, C] from gram_block_features(map, {self.powers}); got "
                                 f"{tuple(b.shape)}")
        return list(f.blocks)

    def _fold(self, pred: Tensor, blocks: list[Tensor]) -> None:
        for b, v in enumerate(blocks):
            v = v.float()
            index = pred.view(-1, 1, 1).expand_as(v)
            self.mins[b].scatter_reduce_(0, index, v, "amin")
            self.maxs[b].scatter_reduce_(0, index, v, "amax")
        self._fitted_counts.index_add_(0, pred, torch.ones_like(pred))

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        blocks = [b.detach() for b in self._blocks(f)]
        pred = f.logits.argmax(1).to(blocks[0].device)
        k = f.logits.shape[1]
        if self.mins is None:
            self.mins = [torch.full((k, *b.shape[1:]), math.inf, device=b.device) for b in blocks]
            self.maxs = [torch.full((k, *b.shape[1:]), -math.inf, device=b.device) for b in blocks]
            self._fitted_counts = torch.zeros(k, dtype=torch.long, device=pred.device)
        if len(blocks) != len(self.mins):
            raise ValueError(f"got {len(blocks)} blocks, earlier batches had {len(self.mins)}")
        n = len(f)
        index = torch.arange(self._seen, self._seen + n)
        self._seen += n
        candidate = (index % self.holdout_every == 0).to(pred.device)
        fold = ~candidate
        evicted: list[tuple[int, list[Tensor]]] = []
        for i in candidate.nonzero().flatten().tolist():
            item = (int(pred[i]), [b[i].clone() for b in blocks])
            if len(self._reservoir) < self.holdout_size:
                self._reservoir.append(item)
            else:
                j = self._rng.randrange(self._candidates + 1)
                if j < self.holdout_size:
                    evicted.append(self._reservoir[j])
                    self._reservoir[j] = item
                else:
                    evicted.append(item)
            self._candidates += 1
        if fold.any():
            self._fold(pred[fold], [b[fold] for b in blocks])
        if evicted:
            self._fold(torch.tensor([e[0] for e in evicted], device=pred.device),
                       [torch.stack([e[1][b] for e in evicted]) for b in range(len(blocks))])

    def _fit_end(self, pass_index: int) -> None:
        if self.mins is None or self._fitted_counts.sum() == 0:
            raise RuntimeError(f"scorer {self.name!r}: too few ID samples to fit (every "
                               f"{self.holdout_every}th is held out for normalization)")
        unseen = self._fitted_counts == 0
        for mins, maxs in zip(self.mins, self.maxs):
            mins[unseen] = mins[~unseen].amin(0)
            maxs[unseen] = maxs[~unseen].amax(0)
        self.normalizer = torch.ones(len(self.mins), dtype=torch.float64)
        if self._reservoir:
            pred = torch.tensor([r[0] for r in self._reservoir], device=self.mins[0].device)
            for b in range(len(self.mins)):
                values = torch.stack([r[1][b] for r in self._reservoir])
                self.normalizer[b] = self._deviation(b, values, pred).mean()
        zero = self.normalizer <= 0
        if zero.any():
            warnings.warn(f"scorer {self.name!r}: held-out ID samples never deviate in block(s) "
                          f"{zero.nonzero().flatten().tolist()}; using normalizer 1 there")
            self.normalizer[zero] = 1.0
        self._reservoir = []

    def _deviation(self, b: int, values: Tensor, pred: Tensor) -> Tensor:
        mins = _f64(self.mins[b].to(values.device)[pred])
        maxs = _f64(self.maxs[b].to(values.device)[pred])
        v = _f64(values)
        dev = F.relu(mins - v) / (mins + self.EPS).abs() + F.relu(v - maxs) / (maxs + self.EPS).abs()
        return dev.sum((1, 2))

    def _score(self, f: Features) -> Tensor:
        blocks = self._blocks(f)
        if len(blocks) != len(self.mins):
            raise ValueError(f"scorer {self.name!r} was fitted on {len(self.mins)} blocks, got {len(blocks)}")
        pred = f.logits.argmax(1).to(blocks[0].device)
        return sum(self._deviation(b, v, pred) / self.normalizer[b] for b, v in enumerate(blocks))


# ----------------------------------------------------------------------------- classifier-based

class ClassifierScorer(Scorer):
    """A scorer that needs the classifier head's weight [C, D] and bias [C] (logits = W h + b):
    pass `weight=`/`bias=` or call `set_classifier` before fitting."""

    needs_classifier = True
    needs_penultimate = True

    def __init__(self, *, weight: Tensor | None = None, bias: Tensor | None = None):
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        super().__init__()
        if weight is not None:
            self.set_classifier(weight, bias)
        elif bias is not None:
            raise ValueError("bias given without weight")

    def set_classifier(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Set (or replace: resets the fit) the classifier's weight [C, D] and bias [C]."""
        weight = _f64(weight.detach())
        if weight.dim() != 2:
            raise ValueError(f"classifier weight must be [classes, features], got {tuple(weight.shape)}")
        bias = weight.new_zeros(weight.shape[0]) if bias is None else _f64(bias.detach()).to(weight.device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"classifier bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        self.weight, self.bias = weight, bias
        self.reset()
        self._classifier_set()

    def _classifier_set(self) -> None:
        pass

    def _check(self, features: Features, fitting: bool) -> None:
        if self.weight is None:
            raise RuntimeError(f"scorer {self.name!r} needs the classifier's weight and bias: pass "
                               f"weight=, bias= or call set_classifier(weight, bias)")
        super()._check(features, fitting)
        d = features.penultimate.shape[1]
        if d != self.weight.shape[1]:
            raise ValueError(f"penultimate width {d} != classifier weight width {self.weight.shape[1]}")


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
        return _f64(f.penultimate) - self.origin.to(f.penultimate.device)

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        x = self._centred(f)
        if pass_index == 0:
            if self._outer is None:
                self._outer = x.new_zeros(x.shape[1], x.shape[1])
            self._outer += x.T @ x
            self._n += len(f)
            self._maxlogit_sum += float(_f64(f.logits).amax(1).sum())
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
        return self.alpha * self._residual(self._centred(f)) - torch.logsumexp(_f64(f.logits), 1)


class _Reservoir:
    """Seeded uniform sample (without replacement) of at most `size` values from a stream:
    each value gets a random key, the `size` smallest keys are kept (bottom-k sampling).
    Exact (keeps everything) while the stream has at most `size` values."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.values = torch.empty(0, dtype=torch.float64)
        self.keys = torch.empty(0, dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        values = _f64(values.detach().flatten().cpu())
        keys = torch.rand(values.numel(), generator=self.generator, dtype=torch.float64)
        if self.values.numel() >= self.size:
            keep = keys < self.keys.max()
            values, keys = values[keep], keys[keep]
        values, keys = torch.cat([self.values, values]), torch.cat([self.keys, keys])
        if values.numel() > self.size:
            idx = keys.topk(self.size, largest=False).indices
            values, keys = values[idx], keys[idx]
        self.values, self.keys = values, keys


def linear_percentile(values: Tensor, q: float) -> float:
    """numpy's default ('linear') percentile of a 1-d tensor, q in [0, 100]; no size limit."""
    v = values.sort().values
    pos = q / 100 * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (pos - lo) * (v[hi] - v[lo]))


@register("react")
class ReAct(ClassifierScorer):
    """Sun et al. 2021: clip the penultimate activations at c = the `percentile`-th percentile of
    ALL ID fit activation values (h -> min(h, c)), recompute logits = W clip(h) + b, score =
    energy (T=1) of those logits: -logsumexp(W min(h, c) + b).

    The percentile comes from a seeded uniform reservoir sample of `reservoir_size` activation
    values (bottom-k sampling; exact while the fit data has at most that many values;
    rank error ~ sqrt(q(1-q)/size) ~ 3e-4 at the defaults); numpy's linear interpolation."""

    needs_fit = True

    def __init__(self, *, percentile: float = 90.0, reservoir_size: int = 1_000_000, seed: int = 0,
                 weight: Tensor | None = None, bias: Tensor | None = None):
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile={percentile} must be in [0, 100]")
        if int(reservoir_size) < 1:
            raise ValueError(f"reservoir_size={reservoir_size} must be >= 1")
        self.percentile, self.reservoir_size, self.seed = float(percentile), int(reservoir_size), int(seed)
        super().__init__(weight=weight, bias=bias)

    def _reset_stats(self) -> None:
        self._reservoir = _Reservoir(self.reservoir_size, self.seed)

    def _fit_batch(self, f: Features, pass_index: int) -> None:
        self._reservoir.add(f.penultimate)

    def _fit_end(self, pass_index: int) -> None:
        if self._reservoir.values.numel() == 0:
            raise RuntimeError(f"scorer {self.name!r}: no ID samples seen during fit")
        self.threshold = linear_percentile(self._reservoir.values, self.percentile)
        self._reservoir = _Reservoir(self.reservoir_size, self.seed)  # free the sample

    def _score(self, f: Features) -> Tensor:
        h = _native(f.penultimate).clamp(max=self.threshold)
        w, b = self.weight.to(h), self.bias.to(h)
        return -torch.logsumexp(h @ w.T + b, 1)
