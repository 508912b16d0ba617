"""slurm/train_classifier.sh and slurm/mixupoe_pipeline.sh under a real (single-host, throw-away) Slurm cluster.

The cluster comes from tests/slurm_cluster.py (skipped without Slurm/MUNGE or
root).  Every job runs the real 2-process CPU training (accelerate launch
--multi_gpu --num_processes 2) on the demo data.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import TERMINAL_STATES

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train_classifier.sh"


def _cpu_sbatch_args(log: Path) -> list[str]:
    # The script asks for 8 GPUs and 16 CPUs per node; this machine has no GPU
    # and few cores: command-line options override the #SBATCH header.
    cpus = min(2, os.cpu_count() or 1)
    return ["--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=10", f"--output={log}"]


def _submit(cluster, run_dir: Path, log: Path, *overrides: str, demo: Path) -> str:
    return cluster.submit(
        SCRIPT,
        "--preset", "debug",
        f"data.root={demo}",
        "tracking.enabled=false",
        *overrides,
        env={"NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir)},
        sbatch_args=_cpu_sbatch_args(log),
        cwd=REPO,  # becomes SLURM_SUBMIT_DIR, where common.sh finds recipes/
    )


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "<no job log>"


def _status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file()) if root.is_dir() else []


def test_train_classifier_job_completes(slurm_cluster, demo_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_cluster, run_dir, log, demo=demo_root)

    state = slurm_cluster.wait(job, timeout=150)
    text = _read(log)
    assert state == "COMPLETED", f"job {job} ended {state}\n{text}\n{slurm_cluster.logs()}"
    assert slurm_cluster.requeue_count(job) == 0
    status = _status(run_dir)
    assert status.get("state") == "finished", text
    assert status.get("step") == 6  # the debug preset's train.max_steps
    assert status.get("world_size") == 2, status
    assert "--num_processes 2 --multi_gpu" in text
    assert "stage train_classifier finished" in text


def test_train_classifier_preempted_requeued_and_resumed(slurm_cluster, demo_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    max_steps = 120  # ~15 s of training on 2 cores: long enough to pre-empt it after step 20
    job = _submit(
        slurm_cluster, run_dir, log,
        "train.num_epochs=0", f"train.max_steps={max_steps}", "checkpoint.every_steps=20",
        "runtime.log_every=20", "data.num_workers=1",  # loader workers must survive the SIGTERM
        demo=demo_root,
    )

    # once a checkpoint exists, deliver what "#SBATCH --signal=B:USR1@90" would
    slurm_cluster.wait_until(
        lambda: _checkpoints(run_dir) or slurm_cluster.state(job) not in ("PENDING", "RUNNING"),
        timeout=90, what=f"a checkpoint in {run_dir}",
    )
    assert _checkpoints(run_dir), f"job {job} ended before a checkpoint\n{_read(log)}"
    assert _status(run_dir).get("state") == "running", "training finished before it could be pre-empted"
    slurm_cluster.signal(job, "USR1", batch=True)

    slurm_cluster.wait_until(lambda: slurm_cluster.requeue_count(job) >= 1, timeout=90,
                             what=f"job {job} to be requeued")
    state = slurm_cluster.wait(job, timeout=150)
    text = _read(log)  # --open-mode=append: both runs are in one file
    assert state == "COMPLETED", f"job {job} ended {state}\n{text}\n{slurm_cluster.logs()}"
    assert slurm_cluster.requeue_count(job) == 1, text

    # first run: the batch shell forwarded the signal, the trainer saved and stopped
    assert "caught SIGUSR1" in text, text
    stopped = re.search(r"stopped by signal (SIG\w+) at step (\d+); checkpoint ([^;\s]+)", text)
    assert stopped, text
    stop_step = int(stopped.group(2))
    assert 0 < stop_step < max_steps
    assert f"requeueing job {job}" in text
    # second run: same job id and run dir, resumed from that checkpoint
    assert f"job {job} restart 1:" in text, text
    resumed = re.search(r"resumed from (\S+) \(step (\d+)\)", text)
    assert resumed, text
    assert int(resumed.group(2)) == stop_step
    assert Path(resumed.group(1)).name == Path(stopped.group(3)).name
    status = _status(run_dir)
    assert status.get("state") == "finished", (status, text)
    assert status.get("step") == max_steps


def test_train_classifier_failure_exits_nonzero_without_requeue(slurm_cluster, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(slurm_cluster, run_dir, log, demo=tmp_path / "no-such-data")

    state = slurm_cluster.wait(job, timeout=120)
    text = _read(log)
    assert state == "FAILED", f"job {job} ended {state}\n{text}"
    assert slurm_cluster.requeue_count(job) == 0
    info = slurm_cluster.job_info(job) or {}
    assert info.get("ExitCode", "0:0").split(":")[0] != "0", info
    assert "stage train_classifier failed with exit code" in text, text


# --------------------------------------------------------------------------- the MixupOE pipeline

PIPELINE = REPO / "slurm" / "mixupoe_pipeline.sh"


def _wait_all(cluster, job_ids: list[str], timeout: float) -> dict[str, str]:
    """Poll every job each round (a record purged before it was seen would be lost); their end states."""
    deadline = time.monotonic() + timeout
    states: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        states = {job: cluster.state(job) for job in job_ids}
        if all(state in TERMINAL_STATES for state in states.values()):
            return states  # type: ignore[return-value]
        time.sleep(1)
    raise TimeoutError(f"jobs not ended after {timeout}s: {states}\n{cluster.logs()}")


def test_mixupoe_pipeline_runs_every_stage_under_one_parent_run(slurm_cluster, demo_root, tmp_path):
    from mlflow.tracking import MlflowClient

    pipeline_dir, mlflow_uri = tmp_path / "pipeline", f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=mlflow_uri)
    # artifacts under tmp_path too, not in the repository's mlruns/ (the jobs run from the repository)
    client.create_experiment("disttrain", artifact_location=str(tmp_path / "artifacts"))
    env = {**slurm_cluster.env, "SEEDS": "0", "METHODS": "mixup_oe", "EVAL_PRESET": "debug", "NPROC_PER_NODE": "2",
           "SBATCH_ARGS": " ".join(_cpu_sbatch_args(tmp_path / "unused.out")[:-1]),  # logs: PIPELINE_DIR/logs
           "PIPELINE_DIR": str(pipeline_dir), "MLFLOW_TRACKING_URI": mlflow_uri, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    if (Path(sys.executable).parent / "disttrain").exists():
        env["DISTTRAIN"] = str(Path(sys.executable).parent / "disttrain")
    env.pop("DISTTRAIN_PARENT_RUN_ID", None)
    proc = subprocess.run(["bash", str(PIPELINE), "debug", str(demo_root), str(demo_root / "outliers"),
                           str(demo_root / "far_ood")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {row.split("\t")[1]: row.split("\t")[0] for row in (pipeline_dir / "jobs.tsv").read_text().splitlines()}
    slurm_cluster.submitted.extend(jobs.values())  # cancelled at teardown if still there
    assert list(jobs) == ["s0-standard", "s0-finetune-mixup_oe", "s0-evaluate-standard", "s0-evaluate-mixup_oe",
                          "report", "end"], proc.stdout

    states = _wait_all(slurm_cluster, list(jobs.values()), timeout=900)
    logs = "\n".join(f"----- {p.name}\n{_read(p)[-3000:]}" for p in sorted((pipeline_dir / "logs").glob("*.out")))
    assert all(state == "COMPLETED" for state in states.values()), f"{states}\n{logs}\n{slurm_cluster.logs()}"
    run_dirs = ["seed-0/standard", "seed-0/finetune-mixup_oe", "seed-0/evaluate-standard", "seed-0/evaluate-mixup_oe",
                "report"]
    for run_dir in run_dirs:
        assert _status(pipeline_dir / run_dir).get("state") == "finished", f"{run_dir}\n{logs}"
    report = pipeline_dir / "report"
    assert (report / "table5.md").is_file() and (report / "table5.md").read_text().strip(), logs

    # MLflow: the parent run closed FINISHED, every stage nested under it
    parent = (pipeline_dir / "parent_run_id").read_text().strip()
    assert client.get_run(parent).info.status == "FINISHED", logs
    experiment = client.get_experiment_by_name("disttrain")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    stage_runs = [r for run_id, r in runs.items() if run_id != parent]
    assert sorted(r.data.tags.get("disttrain.stage") for r in stage_runs) == \
        ["evaluate", "evaluate", "finetune_oe", "report", "train_classifier"], [r.data.tags for r in stage_runs]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in stage_runs), \
        [r.data.tags for r in stage_runs]
    for run_dir in run_dirs:
        info = json.loads((pipeline_dir / run_dir / "run.json").read_text())
        assert info["mlflow_run_id"] in runs and info["parent_run_id"] == parent, (run_dir, info)
