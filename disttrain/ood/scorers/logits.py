"""Logit-level scorers: MSP, ODIN, energy, max-logit, entropy, KL matching, and CMG's OOD class.

They read the classifier's logits only; the softmax-based ones work in float64 from the logits
(`log_softmax64`), so that confident inputs stay ranked."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from disttrain.ood.scorers.base import Features, Scorer, ScoreArray, native, non_negative, positive, register


def log_softmax64(logits: Tensor, temperature: float = 1.0,
                  probabilities: bool = True) -> tuple[Tensor | None, Tensor]:
    """log softmax(logits / temperature) [N, C] (None without `probabilities`) and log(1 - max softmax)
    [N], in float64, exact for saturated inputs.

    With c = argmax and r = log sum_{j != c} exp(z_j - z_c) (a logsumexp: no underflow):
        log p_j = z_j - z_c - log1p(e^r),    log(1 - p_c) = r - log1p(e^r).
    A float32 softmax is exactly 1.0 once the runner-up trails by ~17 (float64: ~37), and torch's
    log_softmax forms 1 + e^r before its log, so log p_c = 0 there; here log p_c = -e^r to full
    precision and 1 - p_c is never formed. Differentiable (the argmax's own term is masked with
    -inf, which passes no gradient): ODIN's input preprocessing differentiates it. One float64
    copy of the logits, updated in place (none of the in-place steps is one autograd needs)."""
    z = logits.to(torch.float64, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    top_value, top = z.max(1, keepdim=True)
    z.sub_(top_value)
    others = z.scatter(1, top, -math.inf) if probabilities else z.scatter_(1, top, -math.inf)
    rest = torch.logsumexp(others, 1)  # log(1 - p_c) - log(p_c)
    log_norm = F.softplus(rest)  # log1p(e^r), exact for r << 0
    return (z.sub_(log_norm[:, None]) if probabilities else None), rest - log_norm


def expm1(scores: ScoreArray) -> ScoreArray:
    return torch.expm1(scores) if isinstance(scores, Tensor) else np.expm1(scores)



@register("msp")
class MSP(Scorer):
    """Hendrycks & Gimpel 2017: the paper's score is -max softmax probability. STORED: the
    rank-equivalent log(1 - max softmax) (float64, from the logits: `log_softmax64`), so that
    confident inputs stay ranked: -max softmax is exactly -1.0 for every input whose runner-up
    logit trails by more than ~17 (float32) or ~37 (float64), and a quarter of a real ID test set
    tying there reads FPR95 = 100 %. Metrics are unchanged (same ranking); the scores saved to
    scores.npz are these log values: `confidence(scores)` = max softmax prob. = -expm1(score),
    `paper_score(scores)` = -max softmax = expm1(score)."""

    def _score(self, f: Features) -> Tensor:
        return log_softmax64(f.logits, probabilities=False)[1]

    @classmethod
    def confidence(cls, scores: ScoreArray) -> ScoreArray:
        """The max softmax probability (in [0, 1]) of stored MSP scores: -expm1(score)."""
        return -expm1(scores)

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        return -cls.confidence(scores)


@register("ood_class")
class OODClass(Scorer):
    """CMG-softmax (cmg.txt 3.3): the paper's score is the softmax probability p_{N+1} of a
    classifier's extra (N+1)-th OOD class. STORED: log p_{N+1} (float64 log-softmax of the logits,
    `log_softmax64`): the probability underflows or rounds for confident inputs, its log does not.
    Same ranking, same metrics; `paper_score(scores)` = exp(score) = p_{N+1}.
    It reads every output; the other scorers are given the N ID logits only."""

    reads_extra_outputs: ClassVar[bool] = True

    def _score(self, f: Features) -> Tensor:
        return log_softmax64(f.logits)[0][:, -1]

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
        self.temperature = positive("temperature", temperature)
        self.epsilon = non_negative("epsilon", epsilon)
        self.needs_input_grad = self.epsilon > 0
        super().__init__()

    def _score(self, f: Features) -> Tensor:
        return log_softmax64(f.logits, self.temperature, probabilities=False)[1]

    @classmethod
    def paper_score(cls, scores: ScoreArray) -> ScoreArray:
        return expm1(scores)


@register("energy")
class Energy(Scorer):
    """Liu et al. 2020: the free energy -T * logsumexp(logits / T)."""

    score_chunk = 0  # float32 temporaries of the logits' size only, as any energy computation

    def __init__(self, *, temperature: float = 1.0):
        self.temperature = positive("temperature", temperature)
        super().__init__()

    def _score(self, f: Features) -> Tensor:
        if self.temperature == 1.0:
            return torch.logsumexp(native(f.logits), 1).to(torch.float64).neg_()
        return -self.temperature * torch.logsumexp(native(f.logits) / self.temperature, 1)


@register("maxlogit")
class MaxLogit(Scorer):
    """Hendrycks et al. 2022: -max logit."""

    score_chunk = 0  # nothing wider than the logits is made

    def _score(self, f: Features) -> Tensor:
        return native(f.logits).amax(1).to(torch.float64).neg_()


@register("entropy")
class Entropy(Scorer):
    """Entropy of the softmax distribution, -sum p log p (nats), stored as such. Float64 from the
    logits, with d_j = z_j - z_c (c the argmax) and R = sum_{j != c} e^d_j:
        H = log1p(R) - sum_{j != c} e^d_j d_j / (1 + R),
    two positive terms (d_j < 0), so for a confident input both are tiny but representable: it
    stays ranked until the runners-up underflow (logit gaps of ~700)."""

    def _score(self, f: Features) -> Tensor:
        d = f.logits.to(torch.float64, copy=True)
        top_value, top = d.max(1, keepdim=True)
        d.sub_(top_value)
        weights = d.exp()  # e^d_j, the argmax's set to 0 (its d_c = 0 adds nothing to the second sum)
        weights = weights.scatter(1, top, 0.0) if d.requires_grad else weights.scatter_(1, top, 0.0)
        rest = weights.sum(1)
        return torch.log1p(rest) - (weights * d).sum(1) / (1 + rest)


@register("kl_matching")
class KLMatching(Scorer):
    """Hendrycks et al. 2022 ("Scaling OOD detection"): templates d_k = mean softmax of the ID
    fit samples PREDICTED as class k; score = min_k KL(p(x) || d_k), stored as such. Classes
    never predicted during fit have no template and are left out of the min. Template entries
    are clamped at the smallest positive float64 before the log.

    Float64 from the logits (`log_softmax64`), split so that only the final sum rounds: with
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
        logp, log_rest = log_softmax64(f.logits)
        pred = f.logits.argmax(1).to(logp.device)
        # the predicted class's entry as 1 - p_k: its template entry 1 - mean(1 - p_k) keeps its log exact
        mass = logp.exp_().scatter_(1, pred[:, None], log_rest.exp()[:, None])
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
        logp = log_softmax64(f.logits)[0]
        top = f.logits.argmax(1, keepdim=True)  # the argmax of the exact float64 copy
        p = logp.exp()
        neg_entropy = (p * logp).sum(1, keepdim=True)
        others = p.scatter_(1, top, 0.0)  # p_j for j != c: 1 - p_c is never formed
        log_t = self.log_templates.to(p.device)  # [K_seen, C]
        log_t_top = log_t.T[top[:, 0]]  # [N, K_seen]: log d_kc
        small = torch.addcmul(neg_entropy, others.sum(1, keepdim=True), log_t_top)
        small.sub_(others @ log_t.T)  # the bracket, all of its terms small
        return small.sub_(log_t_top).amin(1)


