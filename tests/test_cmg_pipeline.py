"""slurm/cmg_pipeline.sh against a fake `sbatch` (tests/fake_slurm.py): the CMG job chain it submits,
without Slurm. One test uses the real `disttrain pipeline start` with an MLflow sqlite store in
tmp_path; the others a fake `disttrain` that records its calls. Nothing trains: the stage scripts
are only named in the sbatch calls.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests import fake_slurm as fake
from tests.conftest import REPO
from tests.fake_slurm import by_name, submitted

PREFIX = "cmg-debug-"
STAGE_SCRIPTS = {"train_cvae": "24:00:00", "synthesize": "2:00:00", "finetune_head": "4:00:00"}


def run_pipeline(fake_dir: Path, *args: str, **kwargs):
    return fake.run_pipeline("cmg_pipeline.sh", fake_dir, *args, **kwargs)


def pipeline_args(demo: Path) -> list[str]:
    return ["debug", str(demo), "noise:gaussian:50", str(demo / "far_ood")]


def test_submits_the_chain_with_one_parent_run(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), fake_disttrain=False, SEEDS="0 1",
                        METHODS="cmg_softmax cmg_energy", EVAL_PRESET="debug", PIPELINE_DIR=str(pipeline_dir),
                        NPROC_PER_NODE="2", SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2",
                        CVAE_ARGS="train.max_steps=3", SYNTH_ARGS="cmg.count=32", EVALUATE_ARGS="num_draws=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = submitted(fake_slurm)
    # per seed: classifier, cvae, synthesize, 2 fine-tunes, 3 evaluations; then the report and the closing job
    assert len(jobs) == 2 * (3 + 2 + 3) + 2, [j.name for j in jobs]
    named = by_name(jobs, PREFIX)
    assert len(named) == len(jobs)

    # one MLflow parent run, created at submission (real `disttrain pipeline start`), for every job
    parent = (pipeline_dir / "parent_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", parent)
    with sqlite3.connect(fake_slurm / "mlflow.db") as db:
        assert db.execute("select name, status from runs where run_uuid = ?", (parent,)).fetchall() == \
            [("cmg-debug", "RUNNING")]
    run_dirs = fake.check_every_job(jobs, named, parent, pipeline_dir)
    for seed in (0, 1):
        for stage in ("classifier", "cvae", "synthesize", "finetune-cmg_softmax", "finetune-cmg_energy",
                      "evaluate-classifier", "evaluate-cmg_softmax", "evaluate-cmg_energy"):
            assert run_dirs[f"s{seed}-{stage}"] == str(pipeline_dir / f"seed-{seed}" / stage)

    evaluations = []
    for seed in (0, 1):
        classifier, cvae = named[f"s{seed}-classifier"], named[f"s{seed}-cvae"]
        # stage 1: the classifier and the CVAE are independent (they run at the same time)
        assert classifier.script == "train_classifier.sh" and cvae.script == "train_cvae.sh"
        for job in (classifier, cvae):
            assert job.option("dependency") is None, job.args
            assert job.export["NPROC_PER_NODE"] == "2"
            assert job.preset == "debug"
        assert classifier.stage_args() == {"data.root": str(demo_root), "runtime.seed": str(seed)}
        assert cvae.stage_args() == {"data.root": str(demo_root), "runtime.seed": str(seed), "train.max_steps": "3"}

        synthesize = named[f"s{seed}-synthesize"]
        assert synthesize.script == "synthesize.sh"
        assert synthesize.dependency == ("afterok", [classifier.id, cvae.id])
        assert "--kill-on-invalid-dep=yes" in synthesize.args
        assert synthesize.preset == "debug"
        assert synthesize.stage_args() == {
            "method": "cmg", "cvae": run_dirs[f"s{seed}-cvae"], "classifier": run_dirs[f"s{seed}-classifier"],
            "runtime.seed": str(seed), "cmg.count": "32"}

        models = {"classifier": classifier}
        for method in ("cmg_softmax", "cmg_energy"):
            finetune = named[f"s{seed}-finetune-{method}"]
            assert finetune.script == "finetune_head.sh"
            assert finetune.dependency == ("afterok", [synthesize.id])
            assert "--kill-on-invalid-dep=yes" in finetune.args
            assert finetune.preset == "debug"
            assert finetune.stage_args() == {
                "method": method, "classifier": run_dirs[f"s{seed}-classifier"],
                "pseudo": run_dirs[f"s{seed}-synthesize"], "data.root": str(demo_root), "runtime.seed": str(seed)}
            models[method] = finetune
        for label, model in models.items():
            evaluate = named[f"s{seed}-evaluate-{label}"]
            assert evaluate.script == "evaluate.sh"
            assert evaluate.dependency == ("afterok", [model.id])  # the job that made its model
            assert "--kill-on-invalid-dep=yes" in evaluate.args
            assert evaluate.preset == "debug"
            assert evaluate.stage_args() == {
                "model": model.export["RUN_DIR"], "id": f"{demo_root}/test", "fit": f"{demo_root}/train",
                "ood": f"[noise:gaussian:50,{demo_root}/far_ood]", "runtime.seed": str(seed), "num_draws": "2"}
            evaluations.append(evaluate)

    fake.check_report_and_end(jobs, named, evaluations, parent)
    fake.check_user_is_told(proc, jobs, named, parent, pipeline_dir)


def test_defaults(fake_slurm, demo_root, tmp_path):
    """Five seeds, both methods, the cmg evaluate preset, a dated pipeline dir under the repository's runs/."""
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 5 * (3 + 2 + 3) + 2
    assert all(f"--job-name=cmg-debug-s{seed}-finetune-{method} " in proc.stdout
               for seed in range(5) for method in ("cmg_softmax", "cmg_energy"))
    assert sum("--preset cmg " in line for line in lines) == 5 * 3
    dated = rf"RUN_DIR={re.escape(str(REPO))}/runs/pipeline/cmg-debug-\d{{8}}-\d{{6}}/seed-4/cvae"
    assert re.search(dated, proc.stdout)


def test_closing_job_marks_the_parent_run_by_the_report(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="cmg_energy",
                        PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fake.check_closing_job(fake_slurm, pipeline_dir, PREFIX)


def test_dry_run_submits_nothing(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0 1", METHODS="cmg_softmax cmg_energy",
                        DRY_RUN="1", PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 18
    assert "DISTTRAIN_PARENT_RUN_ID=<parent-run-id>" in lines[0]
    assert "--dependency" not in lines[8] and "--dependency" not in lines[9]  # s1 classifier, s1 cvae
    assert "--dependency=afterok:<s1-classifier>:<s1-cvae>" in lines[10]
    assert "--dependency=afterok:<s1-synthesize>" in lines[11]
    fake.check_dry_run(fake_slurm, pipeline_dir)


def test_failed_submission_cancels_what_was_submitted(fake_slurm, demo_root, tmp_path):
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="cmg_energy",
                        PIPELINE_DIR=str(tmp_path / "pipeline"), FAKE_SBATCH_FAIL_AT="3")
    fake.check_failed_submission(proc, fake_slurm, "s0-synthesize")


@pytest.mark.parametrize("case, message", [
    ("no arguments", "expected PRESET DATA_ROOT and at least one OOD_SET, got 0"),
    ("no OOD set", "expected PRESET DATA_ROOT and at least one OOD_SET, got 2"),
    ("DATA_ROOT missing", "is not a directory"),
    ("DATA_ROOT without train", "has no shard split(s) train"),
    ("OOD set missing", "OOD set"),
    ("unknown method", "unknown method 'mixup_oe'"),
    ("no methods", "METHODS is empty"),
    ("bad seed", "SEEDS: 'x' is not a non-negative integer"),
    ("no sbatch", "not found: run this on a Slurm login node"),
    ("no disttrain", "is not an executable"),
])
def test_bad_input_exits_2_with_a_message(fake_slurm, demo_root, tmp_path, case, message):
    args, env = pipeline_args(demo_root), {}
    if case == "no arguments":
        args = []
    elif case == "no OOD set":
        args = args[:2]
    elif case == "DATA_ROOT missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "DATA_ROOT without train":
        root = tmp_path / "partial"
        root.mkdir()
        (root / "test").symlink_to(demo_root / "test")
        (root / "train").mkdir()  # a folder, but no manifest.json
        args[1] = str(root)
    elif case == "OOD set missing":
        args.append(str(tmp_path / "svhn"))
    elif case == "unknown method":
        env["METHODS"] = "cmg_energy mixup_oe"
    elif case == "no methods":
        env["METHODS"] = " "
    elif case == "bad seed":
        env["SEEDS"] = "0 x"
    elif case == "no sbatch":
        env["SBATCH"] = str(tmp_path / "no" / "sbatch")
    elif case == "no disttrain":
        env["DISTTRAIN"] = str(tmp_path / "no" / "disttrain")
    proc = run_pipeline(fake_slurm, *args, PIPELINE_DIR=str(tmp_path / "pipeline"), **env)
    fake.check_refused(proc, fake_slurm, message)


@pytest.mark.parametrize("stage", sorted(STAGE_SCRIPTS))
def test_stage_script_runs_its_recipe(stage):
    """The CMG stage scripts follow slurm/finetune_oe.sh: its header (own name and time), its common.sh block."""
    text = (REPO / "slurm" / f"{stage}.sh").read_text()
    template = (REPO / "slurm" / "finetune_oe.sh").read_text()
    assert os.access(REPO / "slurm" / f"{stage}.sh", os.X_OK)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    expected = [line.replace("finetune_oe", stage).replace("12:00:00", STAGE_SCRIPTS[stage])
                for line in template.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == expected
    common = template[template.index("_dt_common="):].replace("finetune_oe.py", f"{stage}.py")
    assert text.endswith(common)
    assert f"#   sbatch slurm/{stage}.sh --preset cifar10 " in text
    subprocess.run(["bash", "-n", str(REPO / "slurm" / f"{stage}.sh")], check=True)
