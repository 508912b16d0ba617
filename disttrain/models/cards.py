"""Model cards: what a saved network is, enough to rebuild it and to use it right.

Every stage that saves a network writes its `ModelCard` as `model/model.json` beside the
weights (safetensors). The card names the architecture by its registered name
(`ARCHITECTURES`) with the plain arguments it was built with, so one function,
`build_network(card)`, rebuilds any saved network (untrained: the weights are loaded by
`disttrain.runtime.saved`); the rest tells a later stage how to feed and read it (classes,
image size, normalisation) and where it came from (stage, method, the OOD score the method
is evaluated with, stage-specific provenance in `details`).

Cards written before this type existed (flat dictionaries with `model`/`kind` keys) are read
by `ModelCard.from_dict` too, so older run dirs keep loading.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from disttrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from disttrain.errors import ConfigError
from disttrain.models.classifier import build_classifier
from disttrain.models.cvae import CVAE
from disttrain.models.small_gan import SmallDiscriminator, SmallGenerator

CARD_VERSION = 1
IMAGENET_NORMALIZATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def unit_range(channels: int) -> dict[str, list[float]]:
    """The normalisation of a generator's images: none (pixels in [0, 1])."""
    return {"mean": [0.0] * channels, "std": [1.0] * channels}


# The one model registry: a card's `architecture` -> the function that builds it from the card's
# `arguments`. Generators, discriminators and encoders of the next stages are added here.
ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    "timm_classifier": build_classifier,
    "cvae": CVAE,
    "small_gan_generator": SmallGenerator,
    "small_gan_discriminator": SmallDiscriminator,
}


@dataclass(frozen=True)
class ModelCard:
    architecture: str  # a name in ARCHITECTURES
    arguments: dict[str, Any]  # its builder's keyword arguments (plain JSON values)
    classes: list[str]  # the ID classes, in label order
    image_size: int  # the input size it was trained on
    resize_size: int  # evaluation resizes to this, then centre-crops image_size
    normalization: dict[str, list[float]] = field(default_factory=lambda: dict(IMAGENET_NORMALIZATION))
    stage: str = ""  # the stage that made it (filled in by Run.save_model)
    method: str = ""  # the paper's method (mixup_oe, cmg_softmax, ...); "" for a plain classifier
    score: str = ""  # the OOD score the method is evaluated with (a scorer name)
    detector: str = ""  # the kind evaluate scores with it (disttrain.ood.detectors.DETECTORS; "": classifier)
    ema: bool = False  # whether ema.safetensors was saved beside model.safetensors
    details: dict[str, Any] = field(default_factory=dict)  # stage-specific provenance and settings

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """Outputs of a classifier: its ID classes plus any extra ones (CMG-softmax's OOD class)."""
        return int(self.arguments.get("num_outputs", self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        return {"card_version": CARD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the model card") -> "ModelCard":
        """A card from its JSON; a clear error for an unknown architecture, a missing field or
        arguments the architecture does not take."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} is not a JSON object")
        if "card_version" not in data:
            data = _from_flat(data, where)
        elif data["card_version"] > CARD_VERSION:
            raise ConfigError(f"{where} is a version {data['card_version']} card; this disttrain reads up to "
                              f"version {CARD_VERSION}: update disttrain")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}: it was not written by a disttrain stage")
        card = cls(**{k: v for k, v in data.items() if k in names})
        card.check(where)
        return card

    def check(self, where: str = "the model card") -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"{where} names architecture {self.architecture!r}, which this disttrain does not "
                              f"know; known: {', '.join(sorted(ARCHITECTURES))}")
        if not isinstance(self.arguments, dict) or not isinstance(self.classes, list) or not self.classes:
            raise ConfigError(f"{where}: arguments must be an object and classes a non-empty list")
        if self.num_outputs < self.num_classes:
            raise ConfigError(f"{where} is inconsistent: {self.num_outputs} outputs for {self.num_classes} classes")
        try:
            inspect.signature(ARCHITECTURES[self.architecture]).bind(**self.arguments)
        except TypeError as err:
            raise ConfigError(f"{where}: the arguments {sorted(self.arguments)} do not fit "
                              f"{self.architecture} ({err})") from None


def build_network(card: ModelCard) -> torch.nn.Module:
    """A fresh (untrained) network of the architecture and arguments a card names."""
    return ARCHITECTURES[card.architecture](**card.arguments)


def classifier_card(model_arguments: dict[str, Any], num_outputs: int, classes: list[str], image_size: int,
                    resize_size: int, **fields: Any) -> ModelCard:
    """The card of a timm classifier built by build_classifier(**model_arguments, num_outputs,
    image_size); the ImageNet weights file it may have started from is not part of it."""
    arguments = {key: value for key, value in model_arguments.items() if key not in ("pretrained", "pretrained_file")}
    return ModelCard("timm_classifier", {**arguments, "num_outputs": num_outputs, "image_size": image_size},
                     list(classes), image_size, resize_size, **fields)


def _from_flat(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A card as disttrain wrote it before ModelCard (flat keys) in today's form."""
    common = {"classes", "image_size", "resize_size", "stage", "method", "score", "ema", "num_classes"}
    try:
        if data.get("kind") == "cvae":
            arguments = {"num_classes": data["num_classes"], "image_size": data["image_size"],
                         "channels": data.get("channels", 3), "variant": data["variant"],
                         "latent_dim": data["latent_dim"], "embed_dim": data["embed_dim"]}
            taken = {"kind", "variant", "latent_dim", "embed_dim", "channels"}
            architecture, normalization = "cvae", unit_range(arguments["channels"])
        else:
            stem = data.get("stem") or ("small" if data.get("small_input_stem") else "imagenet")
            arguments = {"name": data["model"], "num_outputs": int(data.get("num_outputs", data["num_classes"])),
                         "image_size": data["image_size"], "stem": stem}
            taken = {"model", "stem", "small_input_stem", "num_outputs"}
            architecture, normalization = "timm_classifier", IMAGENET_NORMALIZATION
        classes = data.get("classes") or [str(i) for i in range(int(data["num_classes"]))]
        return {"card_version": 0, "architecture": architecture, "arguments": arguments, "classes": classes,
                "image_size": data["image_size"], "resize_size": data.get("resize_size", data["image_size"]),
                "normalization": normalization, "stage": data.get("stage", ""), "method": data.get("method", ""),
                "score": data.get("score", ""), "ema": bool(data.get("ema", False)),
                "details": {k: v for k, v in data.items() if k not in common | taken}}
    except KeyError as err:
        raise ConfigError(f"{where} lacks {err.args[0]!r}: it was not written by a disttrain stage") from None
