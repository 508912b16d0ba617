"""The CMG pipeline through its entry points, 2 processes: train_cvae (DeepSpeed ZeRO-2) and the
classifier -> synthesize (every rank writes shards) -> finetune_head cmg_energy / cmg_softmax ->
evaluate -> report; the extractor bitwise frozen, the 80 % margin rule on the real energies; the
ablations; bad input refused before any compute."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from disttrain.data.shards import ShardSplit
from disttrain.data.sources import open_source
from disttrain.data.transforms import eval_transform
from disttrain.methods.outlier_exposure import energy
from disttrain.runtime.saved import load_saved_classifier
from tests.conftest import recipe_command, recipe_env

pytestmark = pytest.mark.slow


def run_recipe(recipe: str, args: list[str], workdir: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(recipe_command(recipe, args, nproc), cwd=workdir, env=recipe_env(workdir),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stage1(demo_root, trained_classifier, tmp_path_factory) -> dict[str, Path]:
    """Stage 1's generator under DeepSpeed ZeRO-2 on 2 processes, and its pseudo-OOD shards (2 processes)."""
    workdir = tmp_path_factory.mktemp("cmg")
    cvae, synth = workdir / "cvae", workdir / "synthesize"
    proc = run_recipe("train_cvae.py", ["--preset", "debug", f"data.root={demo_root}", f"run_dir={cvae}",
                                        "runtime.strategy=deepspeed", "runtime.zero_stage=2"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_recipe("synthesize.py", ["--preset", "debug", "method=cmg", f"cvae={cvae}",
                                        f"classifier={trained_classifier}", f"run_dir={synth}"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir, "cvae": cvae, "synthesize": synth, "classifier": trained_classifier}


def test_cvae_trains_under_deepspeed_on_two_processes(stage1):
    run = json.loads((stage1["cvae"] / "run.json").read_text())
    assert run["world_size"] == 2 and run["strategy"] == "deepspeed"
    card = json.loads((stage1["cvae"] / "model" / "model.json").read_text())
    assert card["stage"] == "train_cvae" and card["architecture"] == "cvae" and len(card["classes"]) == 10
    assert card["details"]["num_train_samples"] == 2000
    summary = json.loads((stage1["cvae"] / "summary.json").read_text())
    assert np.isfinite(summary["eval/loss"]) and summary["eval/kl"] >= 0 and summary["stage_wall_clock_s"] > 0
    assert (stage1["cvae"] / "samples.png").is_file()


def test_synthesize_writes_every_ranks_shards_and_a_manifest(stage1):
    split = ShardSplit.open(stage1["synthesize"] / "pseudo_ood")
    assert split.num_samples == 96  # the debug preset's cmg.count
    assert {name.split("/")[0] for name in split.shard_names} == {"rank-000", "rank-001"}
    assert split.manifest["method"] == "cmg" and split.manifest["sigma"] == 5.0 and split.manifest["world_size"] == 2
    import webdataset as wds

    metas = [json.loads(sample["json"]) for name in split.shard_names
             for sample in wds.WebDataset(str(split.root / name), shardshuffle=False)]
    assert len(metas) == 96 and all(m["class_i"] != m["class_j"] for m in metas)
    run = json.loads((stage1["synthesize"] / "run.json").read_text())
    client = MlflowClient(f"sqlite:///{stage1['workdir']}/mlflow.db")
    assert "grid.png" in [a.path for a in client.list_artifacts(run["mlflow_run_id"])]
    assert client.get_run(run["mlflow_run_id"]).data.metrics["stage_wall_clock_s"] > 0


def energies(model: torch.nn.Module, spec: Path, size: int, resize: int) -> torch.Tensor:
    loader = open_source(str(spec), size).loader(eval_transform(size, resize), batch_size=64, rank=0, world_size=1,
                                                 num_workers=0)
    with torch.no_grad():
        return torch.cat([energy(model(images)) for images, _, _ in loader])


def test_two_stage_pipeline_under_two_processes(launch, demo_root, stage1, tmp_path):
    classifier = stage1["classifier"]
    head_args = ["--preset", "debug", f"data.root={demo_root}", f"classifier={classifier}",
                 f"pseudo={stage1['synthesize']}"]
    before = load_file(classifier / "model" / "model.safetensors")
    runs = {}
    # CMG-e under DDP, CMG-s under DeepSpeed ZeRO-2 (only the last layer is handed to either)
    for method, extra in (("cmg_energy", []), ("cmg_softmax", ["runtime.strategy=deepspeed", "runtime.zero_stage=2"])):
        tuned = launch("finetune_head.py", *head_args, f"method={method}", *extra, run_dir=tmp_path / method)
        assert tuned.returncode == 0, tuned.output[-3000:]
        assert tuned.json("run.json")["world_size"] == 2 and tuned.json("replicas.json")["identical"]
        after = load_file(tuned.run_dir / "model" / "model.safetensors")
        frozen = [key for key in before if not key.startswith("fc.")]
        assert frozen and all(torch.equal(before[key], after[key]) for key in frozen)  # h bitwise unchanged
        card = tuned.json("model/model.json")
        assert card["method"] == method and card["details"]["strategy"] == "frozen" and len(card["classes"]) == 10
        runs[method] = tuned
    energy_card = runs["cmg_energy"].json("model/model.json")
    assert energy_card["score"] == "energy" and energy_card["arguments"]["num_outputs"] == 10
    assert not torch.equal(before["fc.weight"], load_file(runs["cmg_energy"].run_dir / "model" /
                                                          "model.safetensors")["fc.weight"])
    softmax = load_file(runs["cmg_softmax"].run_dir / "model" / "model.safetensors")
    assert runs["cmg_softmax"].json("model/model.json")["score"] == "ood_class"
    assert softmax["fc.weight"].shape[0] == 11  # the (N+1)-th OOD class

    # the margins: 80 % of the ID training energies above m_ind, 80 % of the pseudo-OOD ones below m_ood
    margins = runs["cmg_energy"].json("margins.json")
    model, card = load_saved_classifier(classifier)
    e_id = energies(model, demo_root / "train", card.image_size, card.resize_size)
    e_ood = energies(model, stage1["synthesize"] / "pseudo_ood", card.image_size, card.resize_size)
    assert (margins["num_id"], margins["num_pseudo_ood"]) == (2000, 96)
    assert abs((e_id > margins["m_ind"]).float().mean().item() - 0.8) <= 2 / 2000
    assert abs((e_ood < margins["m_ood"]).float().mean().item() - 0.8) <= 2 / 96

    # evaluate every model; the fine-tuned ones are scored with their method's score
    evaluate = ["--preset", "debug", f"id={demo_root}/test", f"ood=[{demo_root}/holdout,{demo_root}/far_ood]",
                "scorers=[msp]"]
    evaluations = []
    for name, model_dir in (("standard", classifier), *((m, r.run_dir) for m, r in runs.items())):
        ev = launch("evaluate.py", *evaluate, f"model={model_dir}", run_dir=tmp_path / f"evaluate-{name}")
        assert ev.returncode == 0, ev.output[-3000:]
        evaluations.append(str(ev.run_dir))
    rows = json.loads((tmp_path / "evaluate-cmg_softmax" / "results.json").read_text())
    assert {row["scorer"] for row in rows} == {"msp", "ood_class"}

    report = launch("report.py", f"evaluations=[{','.join(evaluations)}]", "standard_scorers=[msp]", nproc=1,
                    run_dir=tmp_path / "report")
    assert report.returncode == 0, report.output[-3000:]
    table1 = report.json("table1.json")["rows"]
    assert [row["ood"] for row in table1] == ["holdout", "far_ood"]
    assert {"MSP", "CMG-e (fine-tune)", "CMG-s (fine-tune)"} <= set(table1[0])
    auroc = {row["scorer"]: row["auroc"] for row in rows if row["ood"] == "holdout"}
    assert table1[0]["CMG-s (fine-tune)"]["mean"] == pytest.approx(auroc["ood_class"])


@pytest.mark.parametrize("option,check", [
    ("strategy=unfrozen", "extractor_changed"),
    ("pseudo_ood.use=false", "no_pseudo"),
    ("strategy=direct", "direct"),
])
def test_ablations_of_section_4_5(launch, demo_root, stage1, tmp_path, option, check):
    args = ["--preset", "debug", f"data.root={demo_root}", f"classifier={stage1['classifier']}",
            f"pseudo={stage1['synthesize']}", "method=cmg_energy", option]
    if check == "direct":
        args += ["model.name=resnet10t", "classifier="]
    tuned = launch("finetune_head.py", *args, nproc=1)
    assert tuned.returncode == 0, tuned.output[-3000:]
    card, margins = tuned.json("model/model.json"), tuned.json("margins.json")
    before = load_file(stage1["classifier"] / "model" / "model.safetensors")
    after = load_file(tuned.run_dir / "model" / "model.safetensors")
    if check == "extractor_changed":
        assert card["details"]["init"] == "unfrozen"
        assert not torch.equal(before["conv1.0.weight"], after["conv1.0.weight"])
    elif check == "no_pseudo":
        assert card["details"]["init"] == "finetune-no-pseudo-ood" and card["details"]["pseudo_ood"] == ""
        assert set(margins) >= {"m_ind"} and "m_ood" not in margins and margins["num_pseudo_ood"] == 0
    else:
        assert card["details"]["init"] == "direct" and card["details"]["classifier"] == ""
        assert card["arguments"]["name"] == "resnet10t"


def test_bad_input_is_refused_before_compute(demo_root, stage1, tmp_path):
    other = tmp_path / "other-classifier"
    (other / "model").mkdir(parents=True)
    card = json.loads((stage1["classifier"] / "model" / "model.json").read_text())
    (other / "model" / "model.json").write_text(json.dumps({**card, "classes": card["classes"][:6],
                                                            "arguments": {**card["arguments"], "num_outputs": 6}}))
    (other / "status.json").write_text(json.dumps({"state": "finished"}))
    empty = tmp_path / "empty-split"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"format": "disttrain-shards/1", "num_samples": 0,
                                                     "classes": [], "class_counts": [], "shards": []}))
    synth = ["--preset", "debug", f"cvae={stage1['cvae']}", f"classifier={stage1['classifier']}",
             f"run_dir={tmp_path / 'synth'}"]
    head = ["--preset", "debug", f"data.root={demo_root}", f"classifier={stage1['classifier']}",
            f"run_dir={tmp_path / 'head'}"]
    cases = [
        ("synthesize.py", [*synth, f"classifier={other}"], "trained on 10 classes"),
        ("synthesize.py", [*synth, "cmg.sigma=0"], "cmg.sigma=0.0 must be > 0"),
        ("synthesize.py", [*synth, "cmg.count=0", "cmg.ratio=0.0001"], "empty pseudo-OOD set"),
        ("synthesize.py", [*synth, f"cvae={stage1['classifier']}"], "not a cvae"),
        ("finetune_head.py", [*head, f"pseudo={empty}"], "lists no shards"),
        ("finetune_head.py", [*head, f"pseudo={stage1['synthesize']}", f"classifier={other}"],
         "trained on 6 classes"),
        ("evaluate.py", ["--preset", "debug", f"model={stage1['classifier']}", f"id={demo_root}/test",
                         f"ood=[{demo_root}/holdout]", "scorers=[ood_class]", f"run_dir={tmp_path / 'ev'}"],
         "extra OOD output"),
    ]
    for recipe, args, message in cases:
        proc = run_recipe(recipe, args, tmp_path, nproc=1)
        assert proc.returncode == 2 and message in proc.stderr + proc.stdout, (message, proc.stderr[-800:])
    assert not (tmp_path / "synth").exists() and not (tmp_path / "head").exists()  # nothing started
