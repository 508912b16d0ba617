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
    cases = [
        ([f"model={tmp_path}", *ok], "holds no classifier"),
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
    assert proc.returncode == 2 and "holds no classifier" in proc.stderr and "Traceback" not in proc.stderr


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
