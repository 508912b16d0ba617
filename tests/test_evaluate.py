"""recipes/evaluate.py: every scorer through the real entry point, 2 processes = 1 process."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from disttrain.config import ConfigError
from disttrain.data.shards import DataError
from disttrain.ood import detectors
from disttrain.ood import scorers as scorer_registry
from tests.conftest import REPO, recipe_env

pytestmark = pytest.mark.slow


@pytest.fixture
def classifier(trained_classifier):
    return trained_classifier


def evaluate_args(classifier, demo_root, *extra):
    return ["--preset", "debug", f"model={classifier}", f"id={demo_root}/test", f"fit={demo_root}/train",
            f"ood=[{demo_root}/holdout,noise:gaussian:37]", *extra]


def plain_classifier_scorers() -> list[str]:
    """Every registered scorer a plain N-class classifier supports (ood_class needs CMG-softmax's extra
    output; tests/test_cmg_stages.py scores it under 2 processes)."""
    return [name for name in scorer_registry.names() if not scorer_registry.SCORERS[name].reads_extra_outputs]


def test_two_processes_equal_one_process_for_every_scorer(launch, classifier, demo_root, tmp_path):
    every = ",".join(plain_classifier_scorers())
    args = evaluate_args(classifier, demo_root, f"scorers=[{every}]", "scorer_args=[mahalanobis.use_blocks=true]")
    one = launch("evaluate.py", *args, nproc=1, run_dir=tmp_path / "one")
    assert one.returncode == 0, one.output[-3000:]
    two = launch("evaluate.py", *args, nproc=2, run_dir=tmp_path / "two")
    assert two.returncode == 0, two.output[-3000:]
    rows_one, rows_two = one.json("results.json"), two.json("results.json")
    assert rows_one == rows_two  # gathered without the padding duplicates: identical numbers
    assert {(r["scorer"], r["ood"]) for r in rows_one} == {(s, o) for s in plain_classifier_scorers()
                                                          for o in ("holdout", "gaussian-noise")}
    for row in rows_one:  # 5:1 base rate: 500 ID vs 100 of the 200 held-out; 185 of the 500 ID vs 37 noise
        assert (row["num_id"], row["num_ood"]) == ((500, 100) if row["ood"] == "holdout" else (185, 37))
        assert all(0.0 <= row[k] <= 1.0 for k in ("auroc", "aupr_in", "aupr_out", "fpr95"))
    assert "| scorer | OOD set | AUROC |" in one.output
    plots = {p.name for p in (tmp_path / "one" / "plots").iterdir()}
    assert "curves_holdout.png" in plots and "density_msp.png" in plots
    assert (tmp_path / "one" / "results.md").read_text().count("\n") == 2 + len(rows_one)


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_named_before_the_long_pass(classifier, demo_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(classifier, unfinished)
    (unfinished / "status.json").write_text(json.dumps({"state": "preempted"}))
    ok = [f"id={demo_root}/test", f"ood=[{demo_root}/holdout]"]
    every = ", ".join(scorer_registry.names())
    cvae_card = json.loads((classifier / "model" / "model.json").read_text())
    cards = {"cvae": {**cvae_card, "architecture": "cvae", "arguments": {"num_classes": 10, "image_size": 32}},
             "unknown_detector": {**cvae_card, "detector": "rejection_head9"},
             "bigger_head": {**cvae_card, "arguments": {**cvae_card["arguments"], "num_outputs": 12}}}
    for name, card in cards.items():
        shutil.copytree(classifier, tmp_path / name)
        (tmp_path / name / "model" / "model.json").write_text(json.dumps(card))
    cases = [
        ([f"model={tmp_path}", *ok], "holds no saved model"),
        ([f"model={tmp_path / 'cvae'}", *ok], "holds a cvae, not a classifier"),
        ([f"model={tmp_path / 'unknown_detector'}", *ok], "detector 'rejection_head9', which this disttrain does not "
                                                           "know; known: classifier"),
        ([f"model={tmp_path / 'bigger_head'}", *ok], "does not fit its card"),
        ([f"model={unfinished}", *ok], "has not finished"),
        ([f"model={classifier}", f"id={demo_root}/test", f"ood=[{empty}]"], "has no images"),
        ([f"model={classifier}", f"id={demo_root}/test", f"ood=[{tmp_path}/nowhere]"], "does not exist"),
        ([f"model={classifier}", *ok, "scorers=[msp,nosuch]"], f"unknown scorer 'nosuch'; registered scorers: {every}"),
        ([f"model={classifier}", *ok, "scorers=[odin]", "scorer_args=[odin.temp=3]"], "temperature"),
        ([f"model={classifier}", *ok, "scorers=[mahalanobis]"], "fit=<the ID training split>"),
        ([f"model={classifier}", *ok, "scorers=[vim]", f"fit={demo_root}/test"], "is the ID test set"),
        ([f"model={classifier}", f"id={demo_root}/test", "ood=[noise:pink]"], "noise:gaussian"),
        ([f"model={classifier}", *ok, "use_ema=true", "scorers=[msp]", "base_rate=five"], "base_rate='five'"),
    ]
    recipe = load_recipe("evaluate")
    for args, message in cases:
        with pytest.raises((ConfigError, DataError)) as err:
            recipe.main(["--preset", "debug", f"run_dir={tmp_path}/run", *args])
        assert message in str(err.value)
        assert not (tmp_path / "run").exists()
    # through the command line: one line on stderr, exit code 2, no traceback
    proc = subprocess.run([sys.executable, str(REPO / "recipes/evaluate.py"), "--preset", "debug",
                           f"run_dir={tmp_path}/run", f"model={tmp_path}", *ok], capture_output=True, text=True,
                          cwd=tmp_path, env=recipe_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "holds no saved model" in proc.stderr and "Traceback" not in proc.stderr


def test_splits_rank_from_a_trained_classifier(classifier, demo_root, tmp_path, capsys):
    """`disttrain splits rank --model`: the classifier's predictions on a test split rank its classes."""
    from disttrain import cli
    from disttrain.data.splits import class_ranking_scores, read_split

    out = tmp_path / "split.json"
    cli.main(["splits", "rank", "--model", str(classifier), "--data", str(demo_root / "test"), "--num-id", "6",
              "--out", str(out)])
    split = read_split(out)
    assert len(split["id"]) == 6 and len(split["ood"]) == 4 and "6 ID classes" in capsys.readouterr().out
    scores = split["details"]["scores"]
    assert min(scores[i] for i in split["id"]) >= max(scores[i] for i in split["ood"])
    # the same ranking from a saved prediction table
    from disttrain.runtime.saved import predict_saved_classifier

    probs, labels, _ = predict_saved_classifier(classifier, str(demo_root / "test"))
    np.savez(tmp_path / "preds.npz", probs=probs, labels=labels)
    np.testing.assert_allclose(class_ranking_scores(probs, labels), scores, atol=1e-5)
    cli.main(["splits", "rank", "--predictions", str(tmp_path / "preds.npz"), "--num-id", "6", "--out",
              str(tmp_path / "again.json")])
    assert read_split(tmp_path / "again.json")["id"] == split["id"]


class PixelDistance(detectors.Detector):
    """A detector registered outside evaluate's code: the squared distance of an image to the mean
    ID training image (fitted in one streaming pass); no classification, so no ID accuracy."""

    def __init__(self, card, run_dir, **_options):
        self.card, self.names, self.fit_passes, self.fitting = card, ["pixel_distance"], 1, ["pixel_distance"]
        self.total, self.count = None, 0

    def forward(self, images, labels, perturb=False, autocast=None):
        return {"pixels": images.flatten(1).double().cpu()}

    def fit_batch(self, fit_pass, outputs):
        batch = outputs["pixels"]
        self.total = batch.sum(0) if self.total is None else self.total + batch.sum(0)
        self.count += len(batch)

    def fit_end(self, fit_pass):
        self.mean = self.total / self.count

    def scores(self, outputs):
        return {"pixel_distance": (outputs["pixels"] - self.mean).square().mean(1).numpy()}


def test_a_registered_detector_is_scored_without_touching_evaluate(classifier, demo_root, tmp_path):
    detectors.register("test_pixel_distance")(PixelDistance)
    saved = tmp_path / "pixel-detector"
    shutil.copytree(classifier, saved)
    card = json.loads((saved / "model" / "model.json").read_text())
    (saved / "model" / "model.json").write_text(json.dumps({**card, "detector": "test_pixel_distance"}))
    recipe = load_recipe("evaluate")
    recipe.main(["--preset", "debug", f"detector={saved}", f"id={demo_root}/test", f"fit={demo_root}/train",
                 "fit_max_samples=300", "ood=[noise:uniform:40]", "tracking.enabled=false", "num_workers=0",
                 "plots=false", f"run_dir={tmp_path / 'run'}"])
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [row["scorer"] for row in rows] == ["pixel_distance"] and np.isnan(rows[0]["id_accuracy"])
    assert rows[0]["auroc"] > 0.75, rows  # a weak detector (measured 0.87), but far above chance: the fit is used
    scores = np.load(tmp_path / "run" / "scores.npz")
    assert set(scores.files) == {f"pixel_distance/{name}" for name in ("test", "uniform-noise")}, scores.files
