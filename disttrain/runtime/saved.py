"""Models saved by a finished stage (run_dir/model/), loaded back for use outside training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disttrain.config import ConfigError, ModelConfig
from disttrain.runtime.run import read_status


def saved_model_card(run_dir: str | Path) -> dict[str, Any]:
    """The model card of a finished stage; a clear error when `run_dir` is not one."""
    card = Path(run_dir) / "model" / "model.json"
    if not card.is_file():
        raise ConfigError(f"{run_dir} holds no classifier ({card} is missing): point at the run dir of a "
                          f"finished train_classifier (or fine-tuning) stage")
    state = read_status(run_dir).get("state")
    if state != "finished":
        raise ConfigError(f"{run_dir} is a stage that has not finished (status: {state}); resume it first")
    return json.loads(card.read_text())


def build_saved_architecture(card: dict[str, Any]) -> torch.nn.Module:
    """A fresh (untrained) network of the architecture a model card describes, with its outputs:
    `num_outputs` (the ID classes plus, e.g., CMG-softmax's OOD class) or `num_classes`."""
    from disttrain.models.classifier import build_classifier

    model_cfg = ModelConfig(name=card["model"], stem=card_stem(card))
    return build_classifier(model_cfg, int(card.get("num_outputs", card["num_classes"])), card["image_size"])


def card_stem(card: dict[str, Any]) -> str:
    """The model.stem a saved classifier was built with; cards written before model.stem existed
    say `small_input_stem` (true: the small stem)."""
    return card.get("stem") or ("small" if card.get("small_input_stem") else "imagenet")


def load_saved_classifier(run_dir: str | Path, use_ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    card = saved_model_card(run_dir)
    if use_ema and not card.get("ema"):
        raise ConfigError(f"{run_dir} saved no EMA weights (its runtime.ema_decay was 0)")
    model = build_saved_architecture(card)
    model.load_state_dict(load_file(Path(run_dir) / "model" / ("ema.safetensors" if use_ema else "model.safetensors")))
    return model.eval().requires_grad_(False), card


def predict_saved_classifier(run_dir: str | Path, data: str, batch_size: int = 64,
                             num_workers: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Softmax probabilities and labels of a saved classifier over an evaluation set (one process)."""
    from disttrain.data.sources import open_source
    from disttrain.data.transforms import eval_transform

    model, card = load_saved_classifier(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    source = open_source(data, card["image_size"])
    loader = source.loader(eval_transform(card["image_size"], card["resize_size"]), batch_size=batch_size, rank=0,
                           world_size=1, num_workers=num_workers)
    probs, labels = [], []
    with torch.no_grad():
        for images, batch_labels, _ in loader:
            probs.append(model(images.to(device)).float().softmax(1).cpu())
            labels.append(batch_labels)
    if source.classes and len(source.classes) != card["num_classes"]:
        raise ConfigError(f"{data} has {len(source.classes)} classes, the classifier {card['num_classes']}: "
                          f"rank on the test split of the classes it was trained on")
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), card


def saved_cvae_card(run_dir: str | Path) -> dict[str, Any]:
    """The card of a finished train_cvae stage; a clear error for anything else."""
    card = saved_model_card(run_dir)
    if card.get("stage") != "train_cvae":
        raise ConfigError(f"{run_dir} holds a {card.get('stage')!r} model, not a CVAE: point at the run dir of a "
                          f"finished train_cvae stage")
    return card


def load_saved_cvae(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A finished train_cvae stage's CVAE (eval mode, frozen) and its card."""
    from safetensors.torch import load_file

    from disttrain.models.cvae import CVAE

    card = saved_cvae_card(run_dir)
    model = CVAE(card["num_classes"], card["image_size"], card["channels"], card["variant"], card["latent_dim"],
                 card["embed_dim"])
    model.load_state_dict(load_file(Path(run_dir) / "model" / "model.safetensors"))
    return model.eval().requires_grad_(False), card
