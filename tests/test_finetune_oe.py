"""The MixupOE pipeline through its entry points: Standard -> finetune_oe -> evaluate -> report, 2 processes;
resume in the middle of fine-tuning; the hyper-parameter sweep; bad input named before any compute."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from disttrain.data.class_filter import stream_classes
from disttrain.data.shards import DataError, ShardSplit
from disttrain.data.stream import OutlierStream
from tests.conftest import interrupt_at_step, recipe_command, recipe_env, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def standard(trained_classifier):
    return trained_classifier


def finetune_args(demo_root, standard, *extra):
    return ["--preset", "debug", f"data.root={demo_root}", f"outliers.root={demo_root}/outliers",
            f"standard={standard}", *extra]


def test_pipeline_end_to_end_under_two_processes(launch, demo_root, standard, tmp_path):
    evaluations = []
    evaluate = ["--preset", "debug", f"id={demo_root}/test", f"fit={demo_root}/train",
                f"ood=[{demo_root}/holdout,{demo_root}/far_ood]", "interpolate=[0.5,0.7]", "interpolate_max=60",
                "scorers=[msp,energy]"]
    run = launch("evaluate.py", *evaluate, f"model={standard}", run_dir=tmp_path / "evaluate-standard")
    assert run.returncode == 0, run.output[-3000:]
    evaluations.append(run.run_dir)
    # Energy-OE under DeepSpeed ZeRO-2 with channels_last (fp32: bf16 on CPU makes this tiny model's
    # gradients overflow now and then, which the loop would skip or stop on); MixupOE under DDP
    scale = {"energy_oe": ["runtime.strategy=deepspeed", "runtime.zero_stage=2", "runtime.channels_last=true",
                           "batch.micro_size=4"], "mixup_oe": []}
    for method in ("energy_oe", "mixup_oe"):
        tuned = launch("finetune_oe.py", *finetune_args(demo_root, standard, f"method={method}", *scale[method]),
                       run_dir=tmp_path / f"finetune-{method}")
        assert tuned.returncode == 0, tuned.output[-3000:]
        assert tuned.json("run.json")["world_size"] == 2 and tuned.json("replicas.json")["identical"]
        assert tuned.json("run.json")["strategy"] == ("deepspeed" if scale[method] else "ddp")
        card = json.loads((tuned.run_dir / "model" / "model.json").read_text())
        assert card["method"] == method and card["details"]["init"] == "finetune" and card["stage"] == "finetune_oe"
        assert card["score"] == ("energy" if method == "energy_oe" else "msp")
        before = load_file(standard / "model" / "model.safetensors")
        after = load_file(tuned.run_dir / "model" / "model.safetensors")
        assert not torch.equal(before["fc.weight"], after["fc.weight"])  # it trained, from the Standard weights
        logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(tuned.json("run.json")["mlflow_run_id"])
        assert logged.data.params["data.outliers.num_samples"] == "2000"
        assert "train/loss_id" in logged.data.metrics and "perf/data_wait_frac" in logged.data.metrics
        run = launch("evaluate.py", *evaluate, f"model={tuned.run_dir}", run_dir=tmp_path / f"evaluate-{method}")
        assert run.returncode == 0, run.output[-3000:]
        rows = run.json("results.json")
        assert {r["ood"] for r in rows} == {"holdout", "far_ood", "interp-0.5", "interp-0.7"}
        scores = np.load(run.run_dir / "scores.npz")
        assert scores["msp/interp-0.5"].shape == (60,) and scores["msp/test"].shape == (500,)
        evaluations.append(run.run_dir)

    report = launch("report.py", f"evaluations=[{','.join(map(str, evaluations))}]", nproc=1,
                    run_dir=tmp_path / "report")
    assert report.returncode == 0, report.output[-3000:]
    table = (report.run_dir / "table5.md").read_text()
    for label in ("MSP", "Energy", "EnergyOE (fine-tune)", "MixupOE (fine-tune)"):
        assert f"| {label}" in table
    assert (report.run_dir / "densities.png").is_file()


def test_sigterm_mid_finetune_then_resume_equals_uninterrupted(launch, demo_root, standard, tmp_path):
    args = finetune_args(demo_root, standard, "method=mixup_oe", "mixup_oe.terms=[id,id_id,id_ood,ood]",
                         "train.max_steps=16", "runtime.log_every=1", "outliers.num_workers=2", "data.num_workers=1")
    straight = launch("finetune_oe.py", *args, run_dir=tmp_path / "straight")
    assert straight.returncode == 0, straight.output[-3000:]

    run_dir = tmp_path / "interrupted"
    status = interrupt_at_step("finetune_oe.py", args, run_dir, tmp_path, step=5)
    assert 5 <= status["step"] < 16

    resumed = launch("finetune_oe.py", *args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{status['step']:08d}" in resumed.output
    a, b = load_file(straight.run_dir / "model" / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume (outlier stream or mixing draws)"


def test_sweep_picks_a_trial_and_finetune_reads_it(demo_root, standard, tmp_path):
    """...and survives a trial stage that stops with its state saved (SIGTERM to the trial alone, as
    a drained node or a stall would do): the trial is started again and resumes."""
    sweep_dir = tmp_path / "sweep"
    args = ["--preset", "debug", f"run_dir={sweep_dir}", f"launcher={recipe_command('', [], 1)[0]}",
            f"finetune=[method=mixup_oe,data.root={demo_root},outliers.root={demo_root}/outliers,"
            f"standard={standard},train.max_steps=4,runtime.heartbeat_seconds=1]", f"id={demo_root}/test",
            "max_acc_drop=1.0"]
    with open(tmp_path / "sweep.log", "w+") as log:
        proc = subprocess.Popen(recipe_command("sweep_oe.py", args, nproc=1), cwd=tmp_path, env=recipe_env(tmp_path),
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        trial = sweep_dir / "trial-00" / "finetune"
        wait_for(lambda: (trial / "status.json").is_file() and json.loads(
            (trial / "status.json").read_text()).get("state") == "running", timeout=300, what="trial 0 running")
        os.kill(json.loads((trial / "status.json").read_text())["pid"], signal.SIGTERM)
        proc.wait(timeout=900)
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-3000:]
    trial_log = (sweep_dir / "trial-00" / "finetune.log").read_text()
    assert "restarting it to resume" in trial_log and "resumed from" in trial_log, trial_log[-3000:]
    chosen = json.loads((sweep_dir / "chosen.json").read_text())
    trials = (sweep_dir / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and chosen["overrides"]["mixup_oe.beta_id_ood"] in ("1", "5")
    rows = json.loads((sweep_dir / "trial-01" / "evaluate" / "results.json").read_text())
    assert {r["ood"] for r in rows} == {"synthetic-gaussian", "synthetic-invert"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    sweep_run = json.loads((sweep_dir / "run.json").read_text())["mlflow_run_id"]
    trial_run = json.loads((sweep_dir / "trial-00" / "finetune" / "run.json").read_text())["mlflow_run_id"]
    assert client.get_run(trial_run).data.tags["mlflow.parentRunId"] == sweep_run
    assert len(client.get_metric_history(sweep_run, "trial/val_aupr_out")) == 2

    # finetune_oe takes the chosen values; the command line still wins
    tuned = subprocess.run(recipe_command("finetune_oe.py", finetune_args(
        demo_root, standard, f"hparams_from={sweep_dir}", "mixup_oe.alpha_id_ood=2", "train.max_steps=2",
        f"run_dir={tmp_path / 'tuned'}"), nproc=1), cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True,
        text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())["config"]
    assert saved["mixup_oe.beta_id_ood"] == float(chosen["overrides"]["mixup_oe.beta_id_ood"])
    assert saved["mixup_oe.alpha_id_ood"] == 2.0


def _labelled_pool(demo_root, tmp_path):
    """The demo's training split as an outlier pool whose manifest records class ids."""
    pool = tmp_path / "pool"
    shutil.copytree(demo_root / "train", pool)
    manifest = json.loads((pool / "manifest.json").read_text())
    manifest["class_ids"] = [f"n{i:08d}" for i in range(len(manifest["classes"]))]
    (pool / "manifest.json").write_text(json.dumps(manifest))
    return pool, manifest


def test_outlier_stream_serves_only_kept_classes(demo_root, tmp_path):
    pool, manifest = _labelled_pool(demo_root, tmp_path)
    keep, report = stream_classes(manifest["classes"], manifest["class_ids"], manifest["class_counts"],
                                  exclude_ids=["n00000000", "n00000003"])
    assert keep == frozenset(range(10)) - {0, 3} and report["kept_classes"] == 8
    stream = OutlierStream(ShardSplit.open(pool), lambda image: torch.zeros(1), batch_size=16, batches_per_epoch=6,
                           rank=0, world_size=1, num_workers=0, seed=0, keep_labels=keep)
    labels = torch.cat([labels for _, labels in stream.loader(0)])
    assert len(labels) == 96 and not set(labels.tolist()) & {0, 3}
    with pytest.raises(DataError, match="leave no class"):
        stream_classes(manifest["classes"], manifest["class_ids"], manifest["class_counts"],
                       exclude_ids=manifest["class_ids"])
    with pytest.raises(DataError, match="records no class ids"):
        stream_classes(["a"], [], [5], benchmark="dog")


def test_bad_input_is_named_before_training(demo_root, standard, tmp_path):
    def run(*args):
        proc = subprocess.run(recipe_command("finetune_oe.py", [*args, f"run_dir={tmp_path / 'bad'}"], nproc=1),
                              cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert not (tmp_path / "bad" / "checkpoints").exists()
        return proc.stderr.strip().splitlines()[-1]

    assert "'oe', 'energy_oe', 'mixup_oe'" in run(*finetune_args(demo_root, standard, "method=mixoe"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(standard, unfinished)
    (unfinished / "status.json").write_text(json.dumps({"state": "running"}))
    assert "has not finished" in run(*finetune_args(demo_root, unfinished))
    assert "holds no saved model" in run(*finetune_args(demo_root, tmp_path))
    pool, manifest = _labelled_pool(demo_root, tmp_path)
    message = run(*finetune_args(demo_root, standard, f"outliers.root={pool}",
                                 f"outliers.exclude_ids=[{','.join(manifest['class_ids'])}]"))
    assert "leave no class" in message
    assert "data.image_size=16" in run(*finetune_args(demo_root, standard, "data.image_size=32",
                                                      "data.resize_size=36"))
