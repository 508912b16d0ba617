"""slurm/train_classifier.sh under a real (single-host, throw-away) Slurm cluster.

The cluster comes from tests/slurm_cluster.py (skipped without Slurm/MUNGE or
root).  Every job runs the real 2-process CPU training (accelerate launch
--multi_gpu --num_processes 2) on the demo data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

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
    stopped = re.search(r"stopped by signal (\d+) at step (\d+); checkpoint ([^;\s]+)", text)
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
