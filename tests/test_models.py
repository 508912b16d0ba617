"""timm classifiers on small images: the stems (model.stem), the ResNets that take them, and the
refusal of an image too small for the model's downsampling, before any compute."""

from __future__ import annotations

import typing

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import ConfigError, ModelConfig
from disttrain.models.classifier import (DEFAULT_STEM, STEMS, build_classifier, check_classifier,
                                         resnet_models, total_reduction)


def test_the_stems_are_the_config_choices():
    """One list of stems: model.stem's choices are the registry's, its default the model's own stem."""
    assert typing.get_args(typing.get_type_hints(ModelConfig)["stem"]) == tuple(STEMS)
    assert ModelConfig().stem == DEFAULT_STEM == "imagenet"


def test_the_stem_check_accepts_exactly_timms_resnet_class():
    """ResNet-like names outside timm's ResNet class (resnetv2_*: a `stem` module; resnext26ts,
    seresnet33ts: ByobNets) are refused by name before anything is built."""
    assert {"resnet10t", "resnet18d", "resnext50_32x4d", "seresnet50", "wide_resnet50_2"} <= resnet_models()
    check_classifier("resnet50.a1_in1k", 32, stem="small")  # a pretrained tag is the model
    for name in ("resnetv2_50", "resnext26ts", "seresnet33ts", "resnet51q", "convnext_tiny"):
        with pytest.raises(ConfigError, match=r"model.stem=small .* ResNet class.*module='resnet'.*seresnet\*.*"
                                              r"set model.stem=imagenet"):
            check_classifier(name, 32, stem="small")


@pytest.mark.slow  # all ~80 ResNets, built (twice: the check, the model) and run on the meta device: ~25 CPU-s
def test_every_accepted_resnet_builds_and_runs_with_the_small_stem(monkeypatch):
    # initialisers run PyTorch's Python reference kernels on meta tensors (~4 ms a call, 2/3 of a
    # build) for values that do not exist: skip them
    for init in ("kaiming_normal_", "kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_", "constant_"):
        monkeypatch.setattr(nn.init, init, lambda tensor, *args, **kwargs: tensor)
    x = torch.empty(2, 3, 32, 32, device="meta")
    for name in sorted(resnet_models()):
        with torch.device("meta"):
            net = build_classifier(name, 10, 32, stem="small")
        with torch.no_grad():
            final = net.eval().forward_features(x)
            logits = net.forward_head(final)
        assert final.shape[-2:] == (4, 4), name  # 32 px / 8: the small stem took the stem's /4 away
        assert net.feature_info[-1]["reduction"] == total_reduction(name, "small") == 8, name
        assert logits.shape == (2, 10), name


@pytest.mark.parametrize("name", ["resnet10t", "resnet18", "resnet18d", "resnext50_32x4d", "seresnet18",
                                  "wide_resnet50_2"])
def test_small_stem_trains_real_resnets(name):
    """Real forward and backward on 32 px images: deep stems (resnet10t, resnet18d) as well as the 7x7 one."""
    torch.manual_seed(0)
    net = build_classifier(name, 10, 32, stem="small").train()
    assert isinstance(net.conv1, nn.Conv2d) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    final = net.forward_features(images)
    assert final.shape[-2:] == (4, 4)
    F.cross_entropy(net.forward_head(final), labels).backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_no_maxpool_stem_keeps_the_stem_and_its_imagenet_weights():
    """no_maxpool: a 2x2 final map at 32 px (not 1x1), the stem's convolutions (and weights) unchanged."""
    torch.manual_seed(0)
    imagenet = timm.create_model("resnet10t", num_classes=10)
    net = build_classifier("resnet10t", 10, 32, stem="no_maxpool")
    net.load_state_dict(imagenet.state_dict())  # strict: the same parameters
    assert isinstance(net.maxpool, nn.Identity) and net.conv1[0].stride == (2, 2)
    assert net.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (2, 2)
    assert [info["reduction"] for info in net.feature_info] == [2, 2, 4, 8, 16]


def test_images_smaller_than_the_downsampling_are_refused():
    """Padding keeps every feature map at least 1x1, so a 1 px image trains; the check refuses an
    image smaller than the model's total downsampling, naming the minimum and the stems that fit."""
    for size in (1, 16):
        with pytest.raises(ConfigError) as err:
            check_classifier("resnet50", size)
        message = str(err.value)
        assert "\n" not in message
        for part in (f"data.image_size={size} is too small for resnet50 with model.stem=imagenet",
                     "downsamples by 32", "data.image_size >= 32", "model.stem=small (from 8 px)",
                     "model.stem=no_maxpool (from 16 px)"):
            assert part in message, message
    check_classifier("resnet50", 32)  # a 1x1 final map: allowed
    check_classifier("resnet50", 8, stem="small")
    check_classifier("resnet50", 16, stem="no_maxpool")
    with pytest.raises(ConfigError, match=r"data.image_size=4 .* downsamples by 8, .* >= 8 \(a 1x1 final map\)$"):
        check_classifier("resnet50", 4, stem="small")  # no stem left to suggest
    with pytest.raises(ConfigError, match=r"data.image_size=16 is too small for convnext_tiny .* >= 32 \(a 1x1 "
                                          r"final map\)$"):
        check_classifier("convnext_tiny", 16)  # any timm model, no stem to suggest


def test_cards_written_before_model_cards_still_build():
    """Flat cards of older runs: `stem`, or before model.stem existed `small_input_stem`; CVAEs by `kind`."""
    from disttrain.models.cards import ModelCard, build_network

    stem = {"stem": "no_maxpool"}, {"small_input_stem": True}, {"small_input_stem": False}, {}
    cards = [ModelCard.from_dict({"model": "resnet10t", "num_classes": 3, "image_size": 32, "init": "finetune", **s})
             for s in stem]
    assert [c.arguments["stem"] for c in cards] == ["no_maxpool", "small", "imagenet", "imagenet"]
    assert cards[0].details == {"init": "finetune"} and cards[0].num_outputs == 3
    old = build_network(cards[1])
    assert isinstance(old.conv1, nn.Conv2d) and isinstance(old.maxpool, nn.Identity)
    cvae = ModelCard.from_dict({"kind": "cvae", "variant": "small", "latent_dim": 8, "embed_dim": 8,
                                "num_classes": 2, "classes": ["a", "b"], "image_size": 16, "channels": 1})
    assert type(build_network(cvae)).__name__ == "CVAE" and cvae.normalization["std"] == [1.0]


def test_a_card_round_trips_and_bad_cards_are_named():
    from disttrain.config import ConfigError
    from disttrain.models.cards import ModelCard, build_network, classifier_card

    card = classifier_card(ModelConfig("resnet10t", stem="small").arguments(), 11, [str(i) for i in range(10)], 32,
                           36, method="cmg_softmax", score="ood_class", details={"init": "finetune"})
    assert ModelCard.from_dict(card.to_dict()) == card and card.num_outputs == 11 and card.num_classes == 10
    assert "pretrained_file" not in card.arguments  # the weights come from the run dir, never from that file
    assert build_network(card).get_classifier().out_features == 11
    bad = [({"architecture": "stylegan9"}, "does not know; known: cvae"),
           ({"arguments": {**card.arguments, "depth": 3}}, "do not fit timm_classifier"),
           ({"arguments": {**card.arguments, "num_outputs": 4}}, "inconsistent: 4 outputs for 10 classes"),
           ({"card_version": 99}, "update disttrain")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            ModelCard.from_dict({**card.to_dict(), **change})
    with pytest.raises(ConfigError, match="lacks classes"):
        ModelCard.from_dict({k: v for k, v in card.to_dict().items() if k != "classes"})


@pytest.mark.slow
def test_train_classifier_with_a_small_stem_and_a_too_small_image(launch, demo_root, tmp_path):
    """Through the entry point: a deep-stem ResNet with the small stem trains and reloads; a 1 px
    image is one line on stderr, exit 2, before a run dir exists."""
    from disttrain.runtime.saved import load_saved_classifier

    args = ["--preset", "debug", f"data.root={demo_root}", "model.name=resnet10t", "model.stem=small"]
    run = launch("train_classifier.py", *args, nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert run.status()["state"] == "finished" and run.json("model/model.json")["arguments"]["stem"] == "small"
    model, _ = load_saved_classifier(run.run_dir)
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.stride == (1, 1)

    refused = launch("train_classifier.py", *args[:2], f"data.root={demo_root}", "data.image_size=1", nproc=1,
                     run_dir=tmp_path / "tiny")
    assert refused.returncode == 2, refused.output[-3000:]
    errors = [line for line in refused.output.splitlines() if "data.image_size=1 " in line]
    assert len(errors) == 1 and "resnet10t" in errors[0] and ">= 16" in errors[0], refused.output[-3000:]
    assert "Traceback" not in refused.output and not (tmp_path / "tiny").exists()
