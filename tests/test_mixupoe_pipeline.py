"""slurm/mixupoe_pipeline.sh against a fake `sbatch` (tests/fake_slurm.py): the job chain it submits,
without Slurm. One test uses the real `disttrain pipeline start` with an MLflow sqlite store in
tmp_path; the others a fake `disttrain` that records its calls. The same chain on a real cluster:
tests/test_slurm.py -k pipeline.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests import fake_slurm as fake
from tests.fake_slurm import by_name, submitted

PREFIX = "mixupoe-debug-"


def run_pipeline(fake_dir: Path, *args: str, **kwargs):
    return fake.run_pipeline("mixupoe_pipeline.sh", fake_dir, *args, **kwargs)


def pipeline_args(demo: Path) -> list[str]:
    return ["debug", str(demo), str(demo / "outliers"), "noise:gaussian:50", str(demo / "far_ood")]


def test_submits_the_chain_with_one_parent_run(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), fake_disttrain=False, SEEDS="0 1",
                        METHODS="oe mixup_oe", EVAL_PRESET="debug", PIPELINE_DIR=str(pipeline_dir),
                        NPROC_PER_NODE="2", SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2",
                        EVALUATE_ARGS="num_draws=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = submitted(fake_slurm)
    # per seed: standard, 2 fine-tunes, 3 evaluations; then the report and the closing job
    assert len(jobs) == 2 * (1 + 2 + 3) + 2, [j.name for j in jobs]
    named = by_name(jobs, PREFIX)
    assert len(named) == len(jobs)

    # one MLflow parent run, created at submission (real `disttrain pipeline start`), for every job
    parent = (pipeline_dir / "parent_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", parent)
    with sqlite3.connect(fake_slurm / "mlflow.db") as db:
        assert db.execute("select name, status from runs where run_uuid = ?", (parent,)).fetchall() == \
            [("mixupoe-debug", "RUNNING")]
    run_dirs = fake.check_every_job(jobs, named, parent, pipeline_dir)
    assert all(Path(d).parent in (pipeline_dir, pipeline_dir / "seed-0", pipeline_dir / "seed-1")
               for d in run_dirs.values()), run_dirs
    assert run_dirs["s0-finetune-mixup_oe"] == str(pipeline_dir / "seed-0" / "finetune-mixup_oe")

    evaluations = []
    for seed in (0, 1):
        standard = named[f"s{seed}-standard"]
        assert standard.script == "train_classifier.sh"
        assert standard.option("dependency") is None
        assert standard.export["NPROC_PER_NODE"] == "2"
        assert standard.stage_args() == {"data.root": str(demo_root), "runtime.seed": str(seed)}
        assert standard.preset == "debug"
        models = {"standard": standard}
        for method in ("oe", "mixup_oe"):
            finetune = named[f"s{seed}-finetune-{method}"]
            assert finetune.script == "finetune_oe.sh"
            assert finetune.dependency == ("afterok", [standard.id])
            assert "--kill-on-invalid-dep=yes" in finetune.args
            assert finetune.stage_args() == {
                "method": method, "standard": run_dirs[f"s{seed}-standard"], "data.root": str(demo_root),
                "outliers.root": str(demo_root / "outliers"), "runtime.seed": str(seed)}
            models[method] = finetune
        for label, model in models.items():
            evaluate = named[f"s{seed}-evaluate-{label}"]
            assert evaluate.script == "evaluate.sh"
            assert evaluate.dependency == ("afterok", [model.id])  # the job that made its model
            assert evaluate.preset == "debug"
            assert evaluate.stage_args() == {
                "model": model.export["RUN_DIR"], "id": f"{demo_root}/test", "fit": f"{demo_root}/train",
                "ood": f"[{demo_root}/holdout,noise:gaussian:50,{demo_root}/far_ood]",
                "interpolate": "[0.5,0.6,0.7]", "interpolate_with": f"{demo_root}/far_ood",  # the last OOD set
                "runtime.seed": str(seed), "num_draws": "2"}
            evaluations.append(evaluate)

    fake.check_report_and_end(jobs, named, evaluations, parent)
    fake.check_user_is_told(proc, jobs, named, parent, pipeline_dir)


def test_closing_job_marks_the_parent_run_by_the_report(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="mixup_oe",
                        PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fake.check_closing_job(fake_slurm, pipeline_dir, PREFIX)


def test_dry_run_submits_nothing(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0 1", METHODS="oe mixup_oe", DRY_RUN="1",
                        PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 14
    assert "--dependency=afterok:<s1-standard>" in lines[7]
    assert "DISTTRAIN_PARENT_RUN_ID=<parent-run-id>" in lines[0]
    fake.check_dry_run(fake_slurm, pipeline_dir)


def test_failed_submission_cancels_what_was_submitted(fake_slurm, demo_root, tmp_path):
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="oe",
                        PIPELINE_DIR=str(tmp_path / "pipeline"), FAKE_SBATCH_FAIL_AT="3")
    fake.check_failed_submission(proc, fake_slurm, "s0-evaluate-standard")


@pytest.mark.parametrize("case, message", [
    ("no arguments", "expected PRESET DATA_ROOT OUTLIER_POOL and at least one OOD_SET, got 0"),
    ("no OOD set", "expected PRESET DATA_ROOT OUTLIER_POOL and at least one OOD_SET, got 3"),
    ("DATA_ROOT missing", "is not a directory"),
    ("DATA_ROOT without shard splits", "has no shard split(s) holdout"),
    ("outlier pool not a split", "is not a shard split"),
    ("OOD set missing", "OOD set"),
    ("INTERPOLATE_WITH not an OOD set", "is not one of the OOD sets"),
    ("unknown method", "unknown method 'mixup'"),
    ("no sbatch", "not found: run this on a Slurm login node"),
    ("no disttrain", "is not an executable"),
])
def test_bad_input_exits_2_with_a_message(fake_slurm, demo_root, tmp_path, case, message):
    demo = str(demo_root)
    args, env = pipeline_args(demo_root), {}
    if case == "no arguments":
        args = []
    elif case == "no OOD set":
        args = args[:3]
    elif case == "DATA_ROOT missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "DATA_ROOT without shard splits":
        root = tmp_path / "partial"
        root.mkdir()
        for name in ("train", "test", "outliers"):
            (root / name).symlink_to(demo_root / name)
        (root / "holdout").mkdir()  # a folder, but no manifest.json
        args[1] = str(root)
    elif case == "outlier pool not a split":
        args[2] = demo
    elif case == "OOD set missing":
        args.append(str(tmp_path / "places365"))
    elif case == "INTERPOLATE_WITH not an OOD set":
        env["INTERPOLATE_WITH"] = f"{demo}/test"
    elif case == "unknown method":
        env["METHODS"] = "oe mixup"
    elif case == "no sbatch":
        env["SBATCH"] = str(tmp_path / "no" / "sbatch")
    elif case == "no disttrain":
        env["DISTTRAIN"] = str(tmp_path / "no" / "disttrain")
    proc = run_pipeline(fake_slurm, *args, PIPELINE_DIR=str(tmp_path / "pipeline"), **env)
    fake.check_refused(proc, fake_slurm, message)
