"""Detectors: what `recipes/evaluate.py` scores images with (higher = more OOD).

A detector may be fitted on the ID training split first, then maps batches of images (with
their labels) to per-sample outputs, and a whole evaluation set's outputs to one or more named
scores. `recipes/evaluate.py` owns everything around it and never looks inside: the sets and
their transform (the detector's image size, resize and normalisation), the streaming fit in
sample order on rank 0, one pass per set on every rank, the gather, the metrics at a base rate,
tables and plots.

    forward(images, labels, perturb, autocast)  every rank, per batch -> {key: Features | Tensor} on the CPU
    fit_batch(fit_pass, outputs)       rank 0, batch_size chunks in sample order, `fit_passes` passes
    fit_end(fit_pass)                  rank 0, after each pass
    fitted_state() / load_fitted(s)    what ranks other than 0 need of the fit (when `forward` uses it)
    scores(outputs)                    rank 0, one set's outputs in sample order -> {name: float64 scores}
    accuracy(outputs)                  rank 0, the ID test set's outputs -> ID accuracy, or None

Kinds are registered by name in `DETECTORS`; a saved network's card names the kind that scores
with it (`ModelCard.detector`; empty: `classifier`, a classifier with post-hoc scorers). The
next stages register theirs (a rejection head, a repair distance, a conditional binary
classifier) here, without touching evaluate's code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from disttrain.errors import ConfigError
from disttrain.models.cards import ModelCard
from disttrain.ood import scorers as scorer_registry
from disttrain.ood.features import FeatureExtractor, concat, to_cpu
from disttrain.ood.scorers import Features

Outputs = dict[Any, Any]  # {key: Features | Tensor}, one batch's or one set's


class Detector:
    """Base class: subclasses set `names`, the card, `fit_passes`, and implement forward / scores."""

    kind: ClassVar[str] = "?"  # set by @register
    names: list[str]  # the scores it gives, one table row per name and OOD set
    card: ModelCard  # the network that defines its input (image size, resize, normalisation)
    fit_passes: int = 0  # passes over the ID training split before scoring (0: nothing to fit)
    fitting: list[str] = []  # the names of the scores that need the fit (for messages)

    # evaluate sets it in a one-process run: outputs may stay on the images' device, where the fit and
    # the scoring then run (with several processes they are gathered across ranks through the CPU)
    keep_outputs_on_device: bool = False

    def setup(self, device: torch.device) -> None:
        """Move what it runs onto `device` (every rank, once the run has started); the weights are
        read when it is built, so a file that does not fit its card is named before any compute."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor, perturb: bool = False,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> Outputs:
        """`perturb`: the pass over an evaluation set (not the fit), where input preprocessing such
        as ODIN's applies; `autocast()`: the run's mixed-precision context for the forward passes."""
        raise NotImplementedError

    def fit_batch(self, fit_pass: int, outputs: Outputs) -> None:
        raise NotImplementedError(f"detector {self.kind!r} fits nothing")

    def fit_end(self, fit_pass: int) -> None:
        pass

    def fitted_state(self) -> Any:
        """What ranks other than 0 need of the fit for `forward` (None: nothing)."""
        return None

    def load_fitted(self, state: Any) -> None:
        pass

    def scores(self, outputs: Outputs) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def accuracy(self, outputs: Outputs) -> float | None:
        return None


DETECTORS: dict[str, Callable[..., Detector]] = {}


def register(kind: str) -> Callable[[type[Detector]], type[Detector]]:
    def add(cls: type[Detector]) -> type[Detector]:
        if kind in DETECTORS:
            raise ValueError(f"detector {kind!r} is already registered")
        cls.kind = kind
        DETECTORS[kind] = cls
        return cls
    return add


def build(card: ModelCard, run_dir: str, **options: Any) -> Detector:
    """The detector that scores with the network saved in `run_dir` (its card names the kind);
    `options` are evaluate's settings (scorers, scorer_args, use_ema, ...). ConfigError before any
    compute for anything that cannot work."""
    kind = card.detector or "classifier"
    if kind not in DETECTORS:
        raise ConfigError(f"{run_dir} is scored by the detector {kind!r}, which this disttrain does not know; "
                          f"known: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[kind](card, run_dir, **options)


# ----------------------------------------------------------------------------- set outputs

def concat_outputs(parts: list[Outputs]) -> Outputs:
    """Batches -> one set (every part carries the same keys)."""
    return {key: concat([p[key] for p in parts]) if isinstance(parts[0][key], Features)
            else torch.cat([p[key] for p in parts]) for key in parts[0]}


def take_outputs(outputs: Outputs, order: torch.Tensor | slice) -> Outputs:
    """Rows `order` of every output."""
    return {key: value.rows(order) if isinstance(value, Features) else value[order] for key, value in outputs.items()}


# ----------------------------------------------------------------------------- classifier + post-hoc scorers

PLAIN = "plain"  # the extractor key of scorers that need no block features


def parse_scorer_args(items: list[str], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """`odin.temperature=1000` -> {"odin": {"temperature": 1000.0}}; values are int, float, bool or str."""
    out: dict[str, dict[str, Any]] = {name: {} for name in wanted}
    for item in items:
        key, _, raw = item.partition("=")
        name, _, param = key.partition(".")
        if not raw or not param:
            raise ConfigError(f"scorer_args entry {item!r}: expected <scorer>.<param>=<value>")
        if name not in out:
            raise ConfigError(f"scorer_args entry {item!r} is for {name!r}, which is not in scorers={wanted}")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[name][param] = value
    return out


@register("classifier")
class ClassifierScorers(Detector):
    """A classifier with post-hoc scorers (MSP, energy, Mahalanobis, ViM, ...): one forward pass per
    batch gives logits, penultimate and (on request) block features; every scorer turns them into
    its score. The score a fine-tuning method is evaluated with (its card's `score`) is always
    among them."""

    def __init__(self, card: ModelCard, run_dir: str, scorers: list[str], scorer_args: list[str],
                 use_ema: bool = False, channels_last: bool = False) -> None:
        if card.architecture != "timm_classifier":
            raise ConfigError(f"{run_dir} holds a {card.architecture}, not a classifier: point model= at the run "
                              f"dir of a classifier stage")
        self.card, self.run_dir, self.use_ema = card, run_dir, use_ema
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.names = list(scorers) + ([card.score] if card.score and card.score not in scorers else [])
        args = parse_scorer_args(scorer_args, self.names)
        try:
            self.scorers = {name: scorer_registry.get(name, **args[name]) for name in self.names}
        except ValueError as err:  # an unknown name or hyper-parameter: the message lists the valid ones
            raise ConfigError(f"scorers / scorer_args: {err}") from None
        self.num_id = card.num_classes
        extra = [name for name, s in self.scorers.items() if s.reads_extra_outputs]
        if extra and card.num_outputs <= self.num_id:
            raise ConfigError(f"scorers {extra} read an extra OOD output, which {run_dir} has not (it outputs its "
                              f"{self.num_id} classes only): use them on a finetune_head method=cmg_softmax model")
        if use_ema and not card.ema:
            raise ConfigError(f"use_ema=true but {run_dir} saved no EMA weights (its runtime.ema_decay was 0)")
        self.fitting = [name for name, s in self.scorers.items() if s.needs_fit]
        self.fit_passes = max([self.scorers[n].fit_passes for n in self.fitting], default=0)
        from disttrain.runtime.saved import load_saved_network  # the one loader of saved weights

        self.model = load_saved_network(run_dir, card, use_ema)

    def setup(self, device: torch.device) -> None:
        model = self.model.to(device, memory_format=self.memory_format)
        head = model.get_classifier()
        for scorer in self.scorers.values():
            if scorer.needs_classifier:  # ViM, ReAct recompute logits from the penultimate features
                scorer.set_classifier(head.weight[:self.num_id].detach().cpu(), head.bias[:self.num_id].detach().cpu())
        # one extractor per scorer that needs block features; the others share the plain one
        self.extractors = {name: FeatureExtractor(model, s.reduce_block)
                           for name, s in self.scorers.items() if s.needs_blocks}
        self.extractors[PLAIN] = FeatureExtractor(model)
        self.key_of = {name: name if name in self.extractors else PLAIN for name in self.scorers}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, perturb: bool = False,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> Outputs:
        """Features per extractor; with `perturb`, scorers with input preprocessing (ODIN) get the
        features of their perturbed inputs too (their input gradient in full precision)."""
        images = images.contiguous(memory_format=self.memory_format)
        move = (lambda features: features) if self.keep_outputs_on_device else to_cpu
        with torch.no_grad(), autocast():
            out: Outputs = {key: move(ex(images, labels)) for key, ex in self.extractors.items()}
        if perturb:
            for name, scorer in self.scorers.items():
                if scorer.needs_input_grad:
                    ex = self.extractors[self.key_of[name]]
                    moved = scorer.perturb(ex, images)
                    with torch.no_grad():
                        out[("perturbed", name)] = move(ex(moved, labels))
        return out

    def fit_batch(self, fit_pass: int, outputs: Outputs) -> None:
        for name in self.fitting:
            if self.scorers[name].fit_passes > fit_pass:
                self.scorers[name].fit_batch(outputs[self.key_of[name]])

    def fit_end(self, fit_pass: int) -> None:
        for name in self.fitting:
            if self.scorers[name].fit_passes > fit_pass:
                self.scorers[name].fit_end()

    def fitted_state(self) -> Any:
        # ranks other than 0 perturb inputs with fitted scorers too: they need the fitted scorers
        return self.scorers if any(self.scorers[n].needs_input_grad for n in self.fitting) else None

    def load_fitted(self, state: Any) -> None:
        if state is not None:
            self.scorers.update(state)

    def scores(self, outputs: Outputs) -> dict[str, np.ndarray]:
        out = {}
        for name, scorer in self.scorers.items():
            features = outputs[("perturbed", name) if scorer.needs_input_grad else self.key_of[name]]
            if not scorer.reads_extra_outputs:  # the ID classes' logits (all of them but CMG-s's)
                features = dataclasses.replace(features, logits=features.logits[:, :self.num_id])
            out[name] = scorer.score(features).double().cpu().numpy()
        return out

    def accuracy(self, outputs: Outputs) -> float | None:
        plain = outputs[PLAIN]
        return float((plain.logits[:, :self.num_id].argmax(1) == plain.labels).float().mean())
