"""recipes/report.py: Tables 5 and 6 and the confidence densities from fake evaluate runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from disttrain.methods.cmg import STAGE2_LOSSES
from disttrain.methods.outlier_exposure import OBJECTIVES
from disttrain.models.cards import classifier_card
from disttrain.ood import scorers as scorer_registry
from disttrain.ood.paper_tables import density_grid, density_values, seed_stat
from tests.conftest import REPO, recipe_command, recipe_env

OODS = ("holdout", "far_ood")
STD = {"auroc_std": 0.01, "aupr_out_std": 0.02, "fpr95_std": 0.03}  # within-run std over draws


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_model(root: Path, name: str, seed: int, card: dict, data_root: str | None = "/data/shards/cub") -> Path:
    """A finished model run dir: model/model.json, status.json and (unless data_root is None) config.json."""
    run_dir = root / "models" / name
    typed = classifier_card({"name": "resnet10t"}, 4, ["a", "b", "c", "d"], 32, 36, stage=card["stage"],
                            method=card.get("method", ""), score=card.get("score", ""),
                            details={k: v for k, v in card.items() if k not in ("stage", "method", "score")})
    write_json(run_dir / "model" / "model.json", typed.to_dict())
    write_json(run_dir / "status.json", {"state": "finished", "stage": card["stage"]})
    if data_root is not None:
        write_json(run_dir / "config.json", {"stage": card["stage"],
                                             "config": {"runtime.seed": seed, "data.root": data_root}})
    return run_dir


STANDARD = {"stage": "train_classifier"}


def finetuned(method: str, init: str = "finetune", score: str = "msp") -> dict:
    return {"stage": "finetune_oe", "method": method, "init": init, "score": score}


def fake_evaluation(root: Path, name: str, model: Path, accuracy: float, metrics: dict[tuple[str, str], tuple],
                    id_spec: str = "/data/shards/cub/test", state: str = "finished") -> Path:
    """An evaluate run dir; metrics[(scorer, ood)] = (fpr95, auroc, aupr_out), means over draws."""
    run_dir = root / "evaluations" / name
    write_json(run_dir / "config.json", {"stage": "evaluate", "config": {"model": str(model), "id": id_spec}})
    write_json(run_dir / "status.json", {"state": state, "stage": "evaluate"})
    rows = [{"scorer": scorer, "ood": ood, "id": "test", "id_accuracy": accuracy, "fpr95": fpr, "auroc": auroc,
             "aupr_out": aupr, "aupr_in": 0.5, "aupr_in_std": 0.0, "fpr95_id_positive": 0.5, "num_draws": 5, **STD}
            for (scorer, ood), (fpr, auroc, aupr) in metrics.items()]
    write_json(run_dir / "results.json", rows)
    rng = np.random.default_rng(0)
    scorers = dict.fromkeys(scorer for scorer, _ in metrics)
    # as stored: msp keeps log(1 - max softmax); the same numbers stand in for the other scorers
    np.savez(run_dir / "scores.npz", **{f"{scorer}/{name}": np.log1p(-rng.uniform(0.3, 1.0, 40))
                                        for scorer in scorers for name in ("test", *OODS)})
    return run_dir


def both(holdout: tuple, far: tuple, scorers: tuple[str, ...] = ("msp", "energy")) -> dict:
    """The same metrics for every scorer (energy a bit worse), on both OOD sets."""
    worse = {"msp": 0.0, "energy": 0.02}
    return {(s, ood): (fpr + worse[s], auroc - worse[s], aupr - worse[s])
            for s in scorers for ood, (fpr, auroc, aupr) in (("holdout", holdout), ("far_ood", far))}


@pytest.fixture
def evaluations(tmp_path: Path) -> list[Path]:
    """Standard (2 seeds), OE fine-tune (2 seeds), MixupOE fine-tune (1 seed), listed out of order."""
    std = [fake_model(tmp_path, f"std-s{s}", s, STANDARD) for s in (0, 1)]
    oe = [fake_model(tmp_path, f"oe-s{s}", s, finetuned("oe")) for s in (0, 1)]
    mix = fake_model(tmp_path, "mix-s0", 0, finetuned("mixup_oe"))
    return [
        fake_evaluation(tmp_path, "mix-s0", mix, 0.97, both((0.25, 0.95, 0.80), (0.02, 0.99, 0.97))),
        fake_evaluation(tmp_path, "oe-s1", oe[1], 0.96, both((0.32, 0.95, 0.70), (0.04, 0.99, 0.96))),
        fake_evaluation(tmp_path, "std-s1", std[1], 0.97, both((0.36, 0.92, 0.64), (0.06, 0.98, 0.90))),
        fake_evaluation(tmp_path, "std-s0", std[0], 0.95, both((0.40, 0.90, 0.60), (0.10, 0.96, 0.94))),
        fake_evaluation(tmp_path, "oe-s0", oe[0], 0.94, both((0.30, 0.93, 0.68), (0.04, 0.99, 0.94))),
    ]


def report(tmp_path: Path, evaluations: list[Path], *extra: str) -> subprocess.CompletedProcess:
    args = [f"evaluations=[{','.join(map(str, evaluations))}]", f"run_dir={tmp_path / 'report'}", *extra]
    return subprocess.run(recipe_command("report.py", args, nproc=1), cwd=tmp_path, env=recipe_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # end to end: most of it is MLflow creating its store
def test_tables_densities_and_artifacts(tmp_path, evaluations):
    proc = report(tmp_path, evaluations)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "report"

    table5 = read_csv(out / "table5.csv")
    assert [(r["D_in"], r["Method"], r["seeds"]) for r in table5] == [
        ("cub", "MSP", "2"), ("cub", "Energy", "2"), ("cub", "OE (fine-tune)", "2"),
        ("cub", "MixupOE (fine-tune)", "1")]
    cells = {r["Method"]: (r["holdout"], r["far_ood"]) for r in table5}
    # FPR95 (0.40, 0.36), AUROC (0.90, 0.92), AUPR-Out (0.60, 0.64): mean ± sample std in %
    assert cells["MSP"] == ("38.0±2.8 / 91.0±1.4 / 62.0±2.8", "8.0±2.8 / 97.0±1.4 / 92.0±2.8")
    assert cells["Energy"][0] == "40.0±2.8 / 89.0±1.4 / 60.0±2.8"
    assert cells["OE (fine-tune)"] == ("31.0±1.4 / 94.0±1.4 / 69.0±1.4", "4.0±0.0 / 99.0±0.0 / 95.0±1.4")
    # one seed: the std over its draws
    assert cells["MixupOE (fine-tune)"] == ("25.0±3.0 / 95.0±1.0 / 80.0±2.0", "2.0±3.0 / 99.0±1.0 / 97.0±2.0")

    md = (out / "table5.md").read_text()
    assert "| MixupOE (fine-tune) † | 1 |" in md
    assert "sample std (ddof=1) over training seeds" in md
    assert "† One training seed only: ± is that run's std over its evaluation draws" in md
    assert "MixupOE (fine-tune) on cub (5 draws)" in md
    record = json.loads((out / "table5.json").read_text())["rows"][0]
    assert record["seeds"] == [0, 1] and record["cells"]["holdout"]["auroc"]["std_over"] == "seeds"
    assert record["cells"]["holdout"]["auroc"]["mean"] == pytest.approx(0.91)

    table6 = read_csv(out / "table6.csv")
    assert table6 == [{"D_in": "cub", "Standard": "96.0±1.4", "OE fine-tune": "95.0±1.4", "MixupOE fine-tune": "97.0"}]
    assert "A value without ± is a single training seed." in (out / "table6.md").read_text()

    assert (out / "densities.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| D_in | Method | seeds | holdout | far_ood |" in proc.stdout and "Table 6" in proc.stdout

    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"table5.md", "table5.csv", "table5.json", "table6.md", "table6.csv", "densities.png"} <= logged
    # one readable figure per OOD set; the headline (mean over seeds and OOD sets) as metrics and an MLflow table
    assert {a.path for a in client.list_artifacts(run_id, "densities/cub")} == {"densities/cub/holdout.png",
                                                                                 "densities/cub/far_ood.png"}
    run = client.get_run(run_id)
    assert run.data.metrics["headline/cub/MSP/auroc"] == pytest.approx((0.91 + 0.97) / 2)
    assert run.data.metrics["headline/cub/OE fine-tune/fpr95"] == pytest.approx((0.31 + 0.04) / 2)
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "headline.json", "type": "table"}]
    headline = json.loads((out / "headline.json").read_text())
    assert headline["columns"][:2] == ["dataset", "method"] and len(headline["data"]) == 4
    assert run.data.tags["disttrain.method"] == "standard,oe,mixup_oe"
    assert not [key for key in run.data.params if key.startswith("runtime.")]


@pytest.mark.slow  # end to end: most of it is MLflow creating its store
def test_several_benchmarks_and_a_model_without_config(tmp_path):
    cub = fake_model(tmp_path, "cub", 0, STANDARD)
    dogs = fake_model(tmp_path, "dogs", 3, finetuned("energy_oe", "scratch", "energy"), data_root=None)
    runs = [fake_evaluation(tmp_path, "cub", cub, 0.9, both((0.4, 0.9, 0.6), (0.1, 0.96, 0.94))),
            fake_evaluation(tmp_path, "dogs", dogs, 0.8, both((0.4, 0.9, 0.6), (0.1, 0.96, 0.94), ("energy",)),
                            id_spec="/data/shards/dogs/test")]
    proc = report(tmp_path, runs, "standard_scorers=[energy]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "report"
    assert [(r["D_in"], r["Method"]) for r in read_csv(out / "table5.csv")] == [
        ("cub", "Energy"), ("dogs", "EnergyOE (scratch)")]
    assert read_csv(out / "table6.csv") == [{"D_in": "cub", "Standard": "90.0", "EnergyOE scratch": "-"},
                                            {"D_in": "dogs", "Standard": "-", "EnergyOE scratch": "80.0"}]
    assert {p.name for p in out.glob("densities*.png")} == {"densities.png", "densities_cub.png"}
    assert "has no 'msp' scores" in proc.stdout and "EnergyOE (scratch) on dogs" in proc.stdout


def _running(tmp_path, runs):
    write_json(runs[0] / "status.json", {"state": "running"})
    return runs[0], "has not finished (status: running)"


def _no_status(tmp_path, runs):
    (runs[0] / "status.json").unlink()
    return runs[0], "has not finished (status: missing)"


def _not_evaluate(tmp_path, runs):
    runs[0] = tmp_path / "models" / "std-s0"
    return runs[0], "is a 'train_classifier' run, not an evaluate run"


def _missing(tmp_path, runs):
    runs[0] = tmp_path / "nowhere"
    return runs[0], "holds no config.json"


def _twice(tmp_path, runs):
    runs.append(runs[0])
    return runs[0], "appears more than once"


@pytest.mark.parametrize("spoil", [_running, _no_status, _not_evaluate, _missing, _twice])
def test_bad_inputs_fail_before_the_run(tmp_path, evaluations, spoil):
    named, message = spoil(tmp_path, evaluations)
    proc = report(tmp_path, evaluations)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(named) in errors[0] and message in errors[0], proc.stderr
    assert not (tmp_path / "report").exists()


def test_seed_stat_and_method_names():
    assert seed_stat([0.90, 0.92]).std == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert seed_stat([0.9], [0.01]).text() == "90.0±1.0" and seed_stat([0.9]).text() == "90.0"
    spec = importlib.util.spec_from_file_location("recipe_report", REPO / "recipes" / "report.py")
    recipe = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(recipe)
    # every finetune_oe and finetune_head method has its paper name
    assert list(recipe.METHOD_LABELS) == [*OBJECTIVES, *STAGE2_LOSSES]


def test_density_grid_shows_msp_confidence_from_stored_scores(tmp_path):
    """MSP stores log(1 - max softmax); the grid shows the max softmax prob. on [0, 1], also for
    saturated inputs (confidence 1 - 1e-22 plots as 1.0), and any other scorer its raw score."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    stored = scorer_registry.get("msp").score(scorer_registry.Features(logits=logits)).numpy()
    rows = {"Standard": {"test": stored, "far_ood": stored[:2]}, "OE": {"test": stored[2:]}}
    values, (lo, hi), label = density_values(rows, "msp")
    assert (lo, hi) == (0.0, 1.0) and label == "confidence (max softmax prob.)"
    confidence = values["Standard"]["test"]
    np.testing.assert_allclose(confidence, torch.softmax(logits.double(), 1).amax(1).numpy(), rtol=1e-12)
    assert all(((0 <= v) & (v <= 1)).all() for by_set in values.values() for v in by_set.values())
    assert confidence[3] == 1.0 and stored[3] < stored[2] < -20  # the stored scores keep them apart

    energy = {"Standard": {"test": np.array([-3.0, -1.0]), "far_ood": np.array([0.5])}}
    raw, (lo, hi), label = density_values(energy, "energy")
    assert raw is energy and (lo, hi) == (-3.0, 0.5) and label == "energy score (higher = more OOD)"
    for scorer in ("msp", "energy"):
        path = density_grid(rows if scorer == "msp" else energy, scorer, tmp_path / f"{scorer}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
