"""Faults a cluster produces, through the user's entry points: two runs on one run dir, kill -9 of
rank 0, of the launcher, a frozen rank, SIGTERM during a stall, damaged and planted checkpoint
files, and exit codes through `disttrain launch`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, VENV_BIN, free_port, recipe_command, recipe_env, wait_for

pytestmark = pytest.mark.slow


def debug_args(demo_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--preset", "debug", f"data.root={demo_root}", f"run_dir={run_dir}", "runtime.log_every=1",
            "runtime.heartbeat_seconds=1", *extra]


def disttrain_launch(args: list[str], nproc: int = 2) -> list[str]:
    """`disttrain launch` with the test launcher options of tests/conftest.py."""
    return [str(VENV_BIN / "disttrain"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(REPO / "recipes" / "train_classifier.py"), *args]


def start(cmd: list[str], workdir: Path) -> subprocess.Popen:
    """In the background, output into a file (a pipe nobody reads would block the run when full)."""
    log = open(workdir / f"output-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=workdir, env=recipe_env(workdir), stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def at_step(run_dir: Path, step: int):
    """Condition: the run says running at optimizer step >= `step` with a checkpoint on disk."""
    return lambda: (status(run_dir).get("state") == "running" and (status(run_dir).get("step") or 0) >= step
                    and any((run_dir / "checkpoints").glob("step-*/meta.json")))


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.returncode, proc.log.read()  # type: ignore[attr-defined]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def rank_pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / ".ranks" / f"rank-{rank}.json").read_text())["pid"]


def run_status(run_dir: Path, workdir: Path) -> str:
    proc = subprocess.run([str(VENV_BIN / "disttrain"), "status", str(run_dir)], capture_output=True, text=True,
                          cwd=workdir, timeout=60)
    return proc.stdout + proc.stderr


def test_second_run_on_a_run_dir_is_refused_and_a_dead_ones_lock_taken_over(demo_root, tmp_path):
    """Two runs on one run dir would destroy each other's checkpoints; kill -9 leaves a dead run that
    `disttrain status` names and the next start takes over."""
    run_dir = tmp_path / "run"
    first = start(recipe_command("train_classifier.py", debug_args(
        demo_root, run_dir, "train.max_steps=400", "checkpoint.every_steps=1"), nproc=1), tmp_path)
    try:
        wait_for(at_step(run_dir, 1), what="the first run's first checkpoint")
        second = subprocess.run(recipe_command("train_classifier.py", debug_args(demo_root, run_dir), nproc=1),
                                cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by another run: pid {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and status(run_dir)["pid"] == first.pid
        assert "alive" in run_status(run_dir, tmp_path)
    finally:
        kill_group(first)  # kill -9: no handler runs
    first.wait(timeout=30)
    assert status(run_dir)["state"] == "running"  # what the dead run left behind...
    report = run_status(run_dir, tmp_path)
    assert "DEAD" in report and f"process {first.pid} on this host is gone" in report, report  # ...is told apart

    third = subprocess.run(recipe_command("train_classifier.py", debug_args(demo_root, run_dir, "train.max_steps=6"),
                                          nproc=1), cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "took over the lock of a dead run" in third.stdout and "resumed from" in third.stdout
    assert status(run_dir)["state"] == "finished" and not (run_dir / ".lock").exists()


def test_a_frozen_rank_ends_the_run_resumably_naming_it(demo_root, tmp_path):
    """A rank stopped (SIGSTOP) mid-training: within the stall timeout the run ends with exit code 75,
    status 'stalled' naming rank 1, the MLflow run KILLED; resume=auto then finishes it."""
    run_dir = tmp_path / "run"
    args = debug_args(demo_root, run_dir, "train.max_steps=400", "checkpoint.every_steps=2",
                      "runtime.stall_timeout_minutes=0.25")
    launcher = start(disttrain_launch(args), tmp_path)
    frozen = None
    try:
        wait_for(at_step(run_dir, 2), what="step 2 on two ranks")
        frozen = psutil.Process(rank_pid(run_dir, 1))
        frozen.suspend()
        started = time.monotonic()
        code, output = finish(launcher, timeout=180)
        waited = time.monotonic() - started
    finally:
        kill_group(launcher)
        if frozen is not None and frozen.is_running():
            frozen.kill()
    assert code == 75, output[-3000:]
    assert waited < 120, f"the stall took {waited:.0f} s to end"
    ended = status(run_dir)
    assert ended["state"] == "stalled" and "rank 1" in ended["error"], ended
    assert "runtime.stall_timeout_minutes" in output
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"

    resumed = subprocess.run(disttrain_launch(debug_args(demo_root, run_dir, "train.max_steps=6")), cwd=tmp_path,
                             env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resumed from" in resumed.stdout and status(run_dir)["state"] == "finished"


def test_sigterm_during_a_stall_ends_within_the_grace_with_state_preempted(demo_root, tmp_path):
    """SIGTERM while a peer is frozen: no step boundary comes, so the stop ends the run after
    runtime.stop_grace_seconds with status 'preempted' (the last checkpoint stands), not 'running'."""
    run_dir = tmp_path / "run"
    args = debug_args(demo_root, run_dir, "train.max_steps=400", "checkpoint.every_steps=2",
                      "runtime.stop_grace_seconds=3")
    launcher = start(disttrain_launch(args), tmp_path)
    frozen = None
    try:
        wait_for(at_step(run_dir, 2), what="step 2 on two ranks")
        frozen = psutil.Process(rank_pid(run_dir, 1))
        frozen.suspend()
        time.sleep(2)
        os.kill(launcher.pid, signal.SIGTERM)  # the scheduler's pre-emption signal
        code, output = finish(launcher, timeout=120)
    finally:
        kill_group(launcher)
        if frozen is not None and frozen.is_running():
            frozen.kill()
    assert code == 75, output[-3000:]
    ended = status(run_dir)
    assert ended["state"] == "preempted" and "stop_grace_seconds" in ended["error"], ended
    assert Path(ended["checkpoint"]).name.startswith("step-")


def test_killing_the_launcher_stops_the_workers_with_a_checkpoint(demo_root, tmp_path):
    """kill -9 of `accelerate launch`: the workers do not train on as orphans; they checkpoint and end."""
    run_dir = tmp_path / "run"
    launcher = start(recipe_command("train_classifier.py", debug_args(demo_root, run_dir, "train.max_steps=400"),
                                    nproc=2), tmp_path)
    try:
        wait_for(lambda: (status(run_dir).get("step") or 0) >= 2, what="step 2 on two ranks")
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "train_classifier.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(workers, timeout=90)
        assert not alive, f"workers still running: {alive}"
    finally:
        kill_group(launcher)
    ended = status(run_dir)
    assert ended["state"] == "preempted" and "launcher" in ended["reason"], ended
    assert (Path(ended["checkpoint"]) / "meta.json").is_file()


def test_exit_codes_pass_through_disttrain_launch(demo_root, tmp_path):
    """2 for bad input (a bad config is refused before any worker starts), 75 for a saved stop."""
    bad = subprocess.run(disttrain_launch(debug_args(demo_root, tmp_path / "bad", "optim.lr=-1")), cwd=tmp_path,
                         env=recipe_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: optim.lr=-1.0 must be > 0", bad.stderr
    assert not (tmp_path / "bad").exists()

    missing = subprocess.run(disttrain_launch(debug_args(tmp_path / "nowhere", tmp_path / "missing")), cwd=tmp_path,
                             env=recipe_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "manifest.json is missing" in missing.stderr

    run_dir = tmp_path / "run"
    launcher = start(disttrain_launch(debug_args(demo_root, run_dir, "train.max_steps=400")), tmp_path)
    try:
        wait_for(lambda: (status(run_dir).get("step") or 0) >= 1, what="step 1")
        os.kill(launcher.pid, signal.SIGTERM)
        code, output = finish(launcher, timeout=120)
    finally:
        kill_group(launcher)
    assert code == 75, output[-3000:]
    assert status(run_dir)["state"] == "preempted" and "run the same command again" in output


def test_damaged_or_planted_checkpoint_files_are_skipped_on_resume(demo_root, tmp_path):
    """A truncated model.safetensors in the newest checkpoint: resume falls back to the one before,
    naming the damaged one. A planted pickle that would create a file: refused, never run."""
    run_dir = tmp_path / "run"
    args = debug_args(demo_root, run_dir, "checkpoint.every_steps=2", "checkpoint.keep_last=3")

    def train(max_steps: int) -> subprocess.CompletedProcess:
        proc = subprocess.run(recipe_command("train_classifier.py", [*args, f"train.max_steps={max_steps}"], nproc=1),
                              cwd=tmp_path, env=recipe_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc

    train(4)
    ckpt = run_dir / "checkpoints"
    weights = ckpt / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = train(6)
    assert "skipped checkpoint step-00000004: model.safetensors has" in resumed.stdout, resumed.stdout
    assert f"resumed from {ckpt}/step-00000002" in resumed.stdout
    assert (ckpt / "damaged-step-00000004").is_dir() and status(run_dir)["step"] == 6

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "step-00000006" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted()))
    again = train(8)
    assert "skipped checkpoint step-00000006: it holds custom_checkpoint_0.pkl" in again.stdout, again.stdout
    assert not marker.exists()
    # what disttrain saves itself is JSON + safetensors; the one pickle left is accelerate's RNG state,
    # which it loads with torch's weights-only unpickler
    states = sorted(p.name for p in (ckpt / "step-00000008" / "states").iterdir())
    assert states == ["loop.json", "scheduler.json"]
    assert [p.name for p in (ckpt / "step-00000008").glob("*.pkl")] == ["random_states_0.pkl"]
