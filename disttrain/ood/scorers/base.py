"""The scorer contract, its registry, and what every family shares.

Convention: `score(features)` returns one float64 OOD score per sample, HIGHER = MORE LIKELY OOD
(energy -T*logsumexp(logits/T), Mahalanobis the distance, ...). Where the paper's own quantity
cannot rank confident inputs in float64 (MSP's -max softmax is exactly -1.0 for every saturated
input, a tie), the scorer stores a rank-equivalent statistic instead (MSP: log(1 - max softmax)):
the metrics are those of the paper's score, and `paper_score(scores)` maps stored scores back.

Contract of a scorer (`Scorer`):
  * class/instance flags tell the feature extractor what to compute: `needs_fit`, `fit_passes`,
    `needs_labels` (fit uses the true ID labels), `needs_penultimate`, `needs_blocks` with
    `block_features` ("pooled": global-average-pooled block maps [N, C_b]; "gram": Gram row-sum
    features [N, powers, C_b]; `reduce_block(map)` computes what the scorer wants),
    `needs_classifier` (call `set_classifier(weight, bias)`), `needs_input_grad` (input
    preprocessing: run `perturb(model_forward, images)` and score the perturbed inputs' features).
  * streaming fit on the ID training split, batch by batch (nothing of size N x D is kept):
        for _ in range(scorer.fit_passes):
            for batch in id_train: scorer.fit_batch(features_of(batch))
            scorer.fit_end()
    or `scorer.fit(batches)` with a re-iterable (list, DataLoader-backed iterable) or a zero-argument
    callable returning a fresh iterable per pass. Only ViM takes two passes.
  * `score(features)` on any batch; scorers with ID statistics raise RuntimeError before fitting.
  * statistics live on the device of the features they were fitted on, and scoring runs there:
    nothing of the fit set is copied to the host.

`SCORERS` is the registry (filled by `@register(name)`); `get(name, **hyperparams)` builds one,
`names()` lists them. Learned heads (an nn.Module inside a Scorer) plug in the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

BlockKind = Literal["pooled", "gram"]
ScoreArray = TypeVar("ScoreArray", Tensor, np.ndarray)  # stored scores as returned, or as saved (scores.npz)
SCORE_CHUNK = 8192  # rows scored per call (Scorer.score_chunk): float64 copies of N x D or N x C stay small


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
    score_chunk: ClassVar[int] = SCORE_CHUNK  # rows scored per call: bounds the intermediates (0: all at once)
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
        chunk = self.score_chunk
        if chunk and len(features) > chunk:  # chunks bound the per-call intermediates (N x D copies)
            return torch.cat([self.score(features.rows(slice(i, i + chunk))) for i in range(0, len(features), chunk)])
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


def f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def native(t: Tensor) -> Tensor:
    """Logit-level scores are computed in the features' own precision (float32 from the extractor;
    bf16/fp16 widened to float32): a float64 copy of 200 000 x 2048 features costs 3 GiB and time,
    for no gain in the ranking. Statistics that accumulate (covariances, sums) stay float64, and so
    do softmax-based scores (`log_softmax64`: a float32 softmax saturates)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name}={value} must be > 0")
    return float(value)


def non_negative(name: str, value: float) -> float:
    if not value >= 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return float(value)



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
        weight = f64(weight.detach())
        if weight.dim() != 2:
            raise ValueError(f"classifier weight must be [classes, features], got {tuple(weight.shape)}")
        bias = weight.new_zeros(weight.shape[0]) if bias is None else f64(bias.detach()).to(weight.device)
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


