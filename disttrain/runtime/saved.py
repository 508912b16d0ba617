"""Models saved by a finished stage (run_dir/model/), loaded back for use outside training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disttrain.errors import ConfigError
from disttrain.models.cards import ModelCard, build_network
from disttrain.runtime.run import read_status


def saved_model_card(run_dir: str | Path) -> ModelCard:
    """The model card of a finished stage; a clear error when `run_dir` is not one, or its card is
    unknown or inconsistent."""
    path = Path(run_dir) / "model" / "model.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no saved model ({path} is missing): point at the run dir of a "
                          f"finished stage that saves one (train_classifier, a fine-tuning stage, train_cvae)")
    state = read_status(run_dir).get("state")
    if state != "finished":
        raise ConfigError(f"{run_dir} is a stage that has not finished (status: {state}); resume it first")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): the run dir is damaged") from None
    return ModelCard.from_dict(data, where=str(path))


def load_saved_network(run_dir: str | Path, card: ModelCard, use_ema: bool = False) -> torch.nn.Module:
    """The network `card` describes with the weights saved beside it (safetensors: never unpickled),
    frozen and in eval mode; a clear error when the weights do not fit the card."""
    return _load_weights(Path(run_dir) / "model", card, use_ema, str(run_dir))


def _load_weights(model_dir: Path, card: ModelCard, use_ema: bool, where: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    if use_ema and not card.ema:
        raise ConfigError(f"{where} saved no EMA weights (its runtime.ema_decay was 0)")
    weights = model_dir / ("ema.safetensors" if use_ema else "model.safetensors")
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing: the run dir is incomplete")
    model = build_network(card)
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as err:
        first = str(err).splitlines()[:3]
        raise ConfigError(f"{weights} does not fit its card ({card.architecture} {card.arguments}): "
                          f"{' '.join(first)}") from None
    return model.eval().requires_grad_(False)


def load_saved_classifier(run_dir: str | Path, use_ema: bool = False) -> tuple[torch.nn.Module, ModelCard]:
    """A finished classifier stage's network (frozen, eval mode) and its card."""
    card = saved_model_card(run_dir)
    expect_architecture(run_dir, card, "timm_classifier", "a classifier stage (train_classifier, finetune_oe, "
                                                           "finetune_head)")
    return load_saved_network(run_dir, card, use_ema), card


def check_card_fits_data(card: ModelCard, option: str, classes: list[str], data: Any, split_root: Path,
                         purpose: str) -> None:
    """A saved classifier's card against the ID data a stage fine-tunes it on: the same classes in the
    same order, and the same data.image_size and data.resize_size (`data`: the stage's data config);
    `option=` names the setting (e.g. "standard='runs/...'"), `purpose` finishes the class message."""
    if card.classes != classes:
        raise ConfigError(f"{option} was trained on {card.num_classes} classes ({card.classes[:3]}...), the ID "
                          f"split {split_root} has {len(classes)} ({classes[:3]}...): {purpose}")
    for key in ("image_size", "resize_size"):
        if getattr(card, key) != getattr(data, key):
            raise ConfigError(f"{option} was trained with {key}={getattr(card, key)}: set "
                              f"data.{key}={getattr(card, key)}")


def expect_architecture(run_dir: str | Path, card: ModelCard, architecture: str, what: str) -> None:
    if card.architecture != architecture:
        raise ConfigError(f"{run_dir} holds a {card.architecture} (saved by {card.stage or 'an older stage'}), "
                          f"not a {architecture}: point at the run dir of {what}")


def predict_saved_classifier(run_dir: str | Path, data: str, batch_size: int = 64,
                             num_workers: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Softmax probabilities and labels of a saved classifier over an evaluation set (one process)."""
    from disttrain.data.sources import open_source
    from disttrain.data.transforms import eval_transform

    model, card = load_saved_classifier(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    source = open_source(data, card.image_size)
    transform = eval_transform(card.image_size, card.resize_size, card.normalization["mean"],
                               card.normalization["std"])
    loader = source.loader(transform, batch_size=batch_size, rank=0, world_size=1, num_workers=num_workers)
    probs, labels = [], []
    with torch.no_grad():
        for images, batch_labels, _ in loader:
            probs.append(model(images.to(device)).float().softmax(1).cpu())
            labels.append(batch_labels)
    if source.classes and len(source.classes) != card.num_classes:
        raise ConfigError(f"{data} has {len(source.classes)} classes, the classifier {card.num_classes}: "
                          f"rank on the test split of the classes it was trained on")
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), card


def load_logged_model(model_uri: str, use_ema: bool = False,
                      dst_path: str | Path | None = None) -> tuple[torch.nn.Module, ModelCard]:
    """A model a stage logged to MLflow (`runs:/<run id>/model`, `models:/<name>/<version>`, ...):
    its files are downloaded (into `dst_path`, else a temporary dir) and loaded like a run dir's
    model/ -- the card from JSON, the weights from safetensors, nothing unpickled. Frozen, eval mode."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst_path or tmp)))
        card_path = local / "model.json"
        if not card_path.is_file():
            raise ConfigError(f"{model_uri} holds no model.json: not a model logged by a disttrain stage")
        card = ModelCard.from_dict(json.loads(card_path.read_text()), where=model_uri)
        return _load_weights(local, card, use_ema, model_uri), card


def saved_cvae_card(run_dir: str | Path) -> ModelCard:
    """The card of a finished train_cvae stage; a clear error for anything else."""
    card = saved_model_card(run_dir)
    expect_architecture(run_dir, card, "cvae", "a finished train_cvae stage")
    return card


def load_saved_cvae(run_dir: str | Path) -> tuple[torch.nn.Module, ModelCard]:
    """A finished train_cvae stage's CVAE (eval mode, frozen) and its card."""
    card = saved_cvae_card(run_dir)
    return load_saved_network(run_dir, card), card
