"""Config validation: every mistake is a ConfigError naming the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from disttrain import config
from disttrain.config import BatchConfig, ConfigError, TrainClassifierConfig
from tests.conftest import REPO


def build(*args: str) -> TrainClassifierConfig:
    return config.parse_cli(TrainClassifierConfig, list(args))


def test_preset_and_overrides_resolve():
    cfg = build("--preset", "debug", "optim.lr=0.3", "runtime.precision=bf16", "batch.micro_size=4",
                "runtime.grad_clip=1", "train.max_steps=1_000")
    assert cfg.optim.lr == 0.3 and cfg.runtime.precision == "bf16" and cfg.batch.micro_size == 4
    assert cfg.runtime.grad_clip == 1.0 and isinstance(cfg.runtime.grad_clip, float)
    assert cfg.train.max_steps == 1000
    assert cfg.model.name == "resnet10t"  # from the preset


def test_paper_preset_follows_mixupoe_appendix_d1():
    cfg = build("--preset", "dog", "run_dir=x", "data.root=y", "model.pretrained_file=w.pth")
    assert (cfg.model.name, cfg.batch.global_size, cfg.optim.lr, cfg.optim.schedule) == ("resnet50", 32, 1e-3, "cosine")
    assert (cfg.data.resize_size, cfg.data.image_size, cfg.train.num_epochs) == (512, 448, 30)
    assert build("--preset", "bird", "data.root=y", "model.pretrained_file=w").train.num_epochs == 60


@pytest.mark.parametrize("arg, words", [
    ("optim.lrr=1", ["unknown config key 'optim.lrr'", "lr", "momentum"]),
    ("nosuch=1", ["unknown config key 'nosuch'", "optim", "run_dir"]),
    ("optim.lr.x=1", ["'optim.lr' is not a section"]),
    ("optim=1", ["'optim' is a section", "optim.lr"]),
    ("optim.lr=fast", ["optim.lr='fast'", "float"]),
    ("batch.micro_size=2.5", ["batch.micro_size='2.5'", "int"]),
    ("runtime.precision=fp8", ["runtime.precision='fp8'", "'fp32'", "'bf16'"]),
    ("runtime.zero_stage=4", ["runtime.zero_stage='4'", "0, 1, 2, 3"]),
    ("runtime.channels_last=maybe", ["runtime.channels_last", "bool"]),
    ("batch.micro_size=0", ["batch.micro_size=0 must be > 0"]),
    ("data.image_size=64", ["data.image_size=64", "data.resize_size"]),
    ("model.pretrained=true", ["model.pretrained_file"]),
    ("justaword", ["expected --preset NAME, key=value"]),
])
def test_bad_overrides_name_the_key(arg, words):
    with pytest.raises(ConfigError) as err:
        build("--preset", "debug", arg)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'.*debug, demo"):
        build("--preset", "tiny")


def test_required_fields_must_be_given():
    with pytest.raises(ConfigError, match="run_dir is required"):
        build("data.root=x")
    with pytest.raises(ConfigError, match="data.root is required"):
        build("--preset", "bird", "run_dir=x", "model.pretrained_file=w")


def test_global_batch_must_split_over_world_size():
    batch = BatchConfig(global_size=32, micro_size=8)
    assert batch.grad_accum_steps(1) == 4 and batch.grad_accum_steps(2) == 2 and batch.grad_accum_steps(4) == 1
    with pytest.raises(ConfigError, match=r"batch.global_size=32 is not divisible by world size 3.*\[1, 2\]"
                       r"|batch.global_size=32 is not divisible by world size 3"):
        batch.grad_accum_steps(3)
    with pytest.raises(ConfigError, match=r"micro_size must be one of \[1, 2, 4\]"):
        BatchConfig(global_size=32, micro_size=8).grad_accum_steps(8)


def test_lists_parse_and_check_item_types():
    assert config._coerce("k", "[1, 2,3]", list[int]) == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"k\[1\]"):
        config._coerce("k", "[1,x]", list[int])


def test_saved_config_round_trips(tmp_path):
    cfg = build("--preset", "demo", "optim.lr=0.25")
    config.save(cfg, tmp_path / "config.json")
    assert config.load(TrainClassifierConfig, tmp_path / "config.json") == cfg


def test_recipe_rejects_bad_input_before_compute(tmp_path, demo_root):
    """A bad value, dataset, model or run dir is one line on stderr and exit code 2, nothing trained."""
    (tmp_path / "a_file").write_text("")
    data = f"data.root={demo_root}"
    cases = [
        ([f"data.root={tmp_path}/nowhere"], "manifest.json is missing"),
        (["optim.momentum=high", data], "optim.momentum='high': expected a float"),
        ([data, "model.name=resnet_51"], "model.name='resnet_51' is not a timm model"),
        ([data, "model.name=vit_tiny_patch16_224"], "only takes 224px inputs but data.image_size=16"),
        ([data, "model.pretrained=true", f"model.pretrained_file={tmp_path}/w.safetensors"], "never downloaded"),
        ([data, f"run_dir={tmp_path}/a_file/run"], "is not writable"),
        ([data, f"checkpoint.resume={tmp_path}/step-00000100"], "is not a complete checkpoint"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(REPO / "recipes/train_classifier.py"), "--preset", "debug",
                               f"run_dir={tmp_path}/run", *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()


def test_pretrained_weights_come_from_the_local_file_only(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from disttrain.models.classifier import build_classifier

    imagenet = timm.create_model("resnet10t", num_classes=1000)
    save_file(imagenet.state_dict(), tmp_path / "resnet10t.safetensors")
    model = build_classifier("resnet10t", 7, 32, pretrained=True,
                             pretrained_file=str(tmp_path / "resnet10t.safetensors"))
    assert torch.equal(model.conv1[0].weight, imagenet.conv1[0].weight)
    assert model.get_classifier().out_features == 7  # a fresh head for the new classes


def test_help_lists_presets_and_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        build("--help")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "presets: debug, demo" in out and "optim.lr = 0.001" in out


def run_recipe(recipe: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / recipe), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_print_config_shows_a_presets_resolved_values_without_running(tmp_path):
    """`--print-config` (or `--help --preset X`) shows what a preset resolves to; nothing runs."""
    shown = run_recipe("train_classifier.py", "--preset", "svhn", "run_dir=r", "data.root=d", "optim.lr=0.5",
                       "--print-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "# train_classifier --preset svhn: resolved config"
    assert "optim.lr = 0.5" in lines and "data.hflip = False" in lines and "model.stem = 'small'" in lines
    helped = run_recipe("train_classifier.py", "--help", "--preset", "cifar10", cwd=tmp_path)
    assert helped.returncode == 0 and "keys (with --preset cifar10):" in helped.stdout
    assert "  data.hflip = True" in helped.stdout and "  batch.global_size = 512" in helped.stdout
    bad = run_recipe("train_classifier.py", "--preset", "svhn", "run_dir=r", "data.root=d", "optim.lr=-1",
                     "--print-config", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: optim.lr=-1.0 must be > 0"
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arg,message", [
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("optim.lr=nan", "optim.lr=nan must be > 0"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction=2.0 must be in [0, 1]"),
    ("runtime.stall_timeout_minutes=-1", "runtime.stall_timeout_minutes=-1.0 must be >= 0"),
    ("optim.momentum=1", "optim.momentum=1.0 must be in [0, 1)"),
])
def test_out_of_range_values_are_refused_naming_the_key(arg, message):
    with pytest.raises(ConfigError) as exc:
        build("--preset", "debug", arg)
    assert str(exc.value) == message


def test_flips_are_one_setting_for_every_training_stage():
    """Digits and house numbers are not flipped, by any stage of their presets; others are."""
    from disttrain.config import FinetuneHeadConfig, TrainCVAEConfig
    from disttrain.data.transforms import train_transform

    for cls in (TrainClassifierConfig, TrainCVAEConfig, FinetuneHeadConfig):
        for name, flips in (("mnist", False), ("svhn", False), ("cifar10", True), ("demo", True)):
            cfg = config.resolve(cls, name)
            assert cfg.data.hflip is flips, (cls.STAGE, name)
    unflipped = train_transform(32, 32, "pad_crop", hflip=False)
    assert not any("Flip" in type(t).__name__ for t in unflipped.transforms)
    assert any("Flip" in type(t).__name__ for t in train_transform(32, 32, "pad_crop").transforms)


def test_evaluate_checks_interpolate_with_only_when_interpolating():
    from disttrain.config import EvaluateConfig

    base = {"run_dir": "r", "model": "m", "id": "i", "ood": "[a,b]", "interpolate_with": "c"}
    assert config.build(EvaluateConfig, None, {**base, "interpolate": "[]"}).interpolate == []
    with pytest.raises(ConfigError, match="interpolate_with='c' is not one of ood"):
        config.build(EvaluateConfig, None, {**base, "interpolate": "[0.5]"})


def test_cifar_style_augmentation_needs_whole_images_at_evaluation():
    common = ["--preset", "debug", "data.root=x", "data.augment=pad_crop", "data.image_size=32"]
    assert config.parse_cli(TrainClassifierConfig, [*common, "data.resize_size=32"]).data.augment == "pad_crop"
    with pytest.raises(ConfigError, match="set data.resize_size=32 too"):
        config.parse_cli(TrainClassifierConfig, [*common, "data.resize_size=36"])


def test_finetune_presets_follow_mixupoe_appendix_d_and_h():
    from disttrain.config import FinetuneOEConfig

    def preset(name):
        return config.build(FinetuneOEConfig, name, {"data.root": "d", "outliers.root": "o"})

    bird, dog, inet = preset("bird"), preset("dog"), preset("inet_a")
    assert (bird.train.num_epochs, bird.optim.lr, bird.optim.schedule) == (10, 1e-3, "cosine")
    assert (bird.batch.global_size, bird.outliers.batch_size, bird.data.image_size) == (32, 32, 448)
    assert (bird.oe.beta, bird.mixup_oe.beta_id_ood, bird.mixup_oe.alpha_id_ood) == (5.0, 5.0, 1.0)
    assert (dog.oe.beta, dog.mixup_oe.beta_id_ood) == (1.0, 1.0)
    assert (bird.energy_oe.m_in, bird.energy_oe.m_out, bird.energy_oe.weight) == (-15.0, -5.0, 0.1)
    assert bird.mixup_oe.terms == ["id", "id_ood"] and bird.outliers.exclude_benchmark == "bird"
    assert bird.standard == "runs/train_classifier/bird"
    assert (inet.oe.beta, inet.energy_oe.m_in, inet.energy_oe.weight) == (0.5, -27.0, 0.05)
    assert (inet.mixup_oe.alpha_id_ood, inet.mixup_oe.beta_id_ood, inet.mixup_oe.coarse) == (0.4, 5.0, True)
    assert (inet.batch.global_size, inet.outliers.batch_size, inet.data.image_size) == (256, 512, 224)
    # from scratch drops the preset's Standard run; a bad term list is named
    assert config.build(FinetuneOEConfig, "bird", {"data.root": "d", "outliers.root": "o",
                                                   "from_scratch": "true"}).standard == ""
    with pytest.raises(ConfigError, match="mixup_oe.terms"):
        config.build(FinetuneOEConfig, "bird", {"data.root": "d", "outliers.root": "o", "mixup_oe.terms": "[id,mix]"})


def test_deepspeed_bf16_is_torch_autocast_around_an_fp32_engine():
    """DeepSpeed's own bf16 casts weights but not BatchNorm's running statistics, which BatchNorm
    cannot mix: under DeepSpeed, bf16 is torch autocast around the forward, the engine in fp32."""
    from disttrain.config import BatchConfig, RuntimeConfig
    from disttrain.runtime.accel import deepspeed_config

    ds = deepspeed_config(RuntimeConfig(precision="bf16", zero_stage=2), BatchConfig(32, 16), 2)
    assert ds["bf16"] == {"enabled": False} and not ds.get("torch_autocast", {}).get("enabled")


def test_classifier_presets_fit_their_image_size():
    """The model check refuses an image smaller than the model's total downsampling (its last map
    would be padding): no preset that builds a model from its config may trip it -- the 16 px debug
    presets drop the stem's max-pool (/16, a 1x1 map) where the ImageNet stem (/32) would not fit."""
    from disttrain.config import FinetuneHeadConfig, FinetuneOEConfig
    from disttrain.models.classifier import total_reduction

    presets = [(TrainClassifierConfig, name) for name in config.presets_for(TrainClassifierConfig)]
    for cls, name in [*presets, (FinetuneOEConfig, "debug"), (FinetuneHeadConfig, "debug")]:
        cfg = config.resolve(cls, name)
        assert cfg.data.image_size >= total_reduction(cfg.model.name, cfg.model.stem), (cls.STAGE, name, cfg.model)
