"""Shared fixtures: the demo dataset (generated once per session) and a launcher for recipes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster", "tests.fake_slurm"]  # a single-host Slurm cluster; a fake sbatch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from disttrain.data import demo

    root = tmp_path_factory.mktemp("demo_data")
    demo.generate(root)
    return root


@dataclass
class Launched:
    returncode: int
    output: str
    run_dir: Path

    def status(self) -> dict:
        path = self.run_dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def json(self, name: str) -> dict:
        return json.loads((self.run_dir / name).read_text())


def recipe_command(recipe: str, args: list[str], nproc: int) -> list[str]:
    script = str(REPO / "recipes" / recipe)
    if nproc == 1:
        return [sys.executable, script, *args]
    return [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), script, *args]


def recipe_env(workdir: Path) -> dict[str, str]:
    """The environment of a recipe under test: offline, unbuffered, its own MLflow store."""
    env = {k: v for k, v in os.environ.items() if k != "DISTTRAIN_PARENT_RUN_ID"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}


@pytest.fixture
def launch(tmp_path: Path):
    """launch(recipe, *key=value, nproc=2) -> Launched; runs in tmp_path with a local MLflow store."""

    def _launch(recipe: str, *args: str, nproc: int = 2, run_dir: Path | None = None, timeout: float = 600,
                env: dict[str, str] | None = None) -> Launched:
        run_dir = run_dir or tmp_path / "run"
        cmd = recipe_command(recipe, [*args, f"run_dir={run_dir}"], nproc)
        proc = subprocess.run(cmd, cwd=tmp_path, env={**recipe_env(tmp_path), **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        return Launched(proc.returncode, proc.stdout + proc.stderr, run_dir)

    return _launch


def interrupt_at_step(recipe: str, args: list[str], run_dir: Path, workdir: Path, step: int) -> dict:
    """Launch `recipe` on 2 processes, SIGTERM the launcher (what Slurm pre-emption does) once it
    logs optimizer step `step`, wait; the run's status.json, which must say pre-empted."""
    cmd = recipe_command(recipe, [*args, f"run_dir={run_dir}"], nproc=2)
    proc = subprocess.Popen(cmd, cwd=workdir, env=recipe_env(workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step}/"):
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", "".join(lines)[-3000:]
    return status


def wait_for(condition, timeout: float = 180, what: str = "") -> None:
    """Poll `condition()` until it holds; a TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise TimeoutError(f"waited {timeout}s for {what}")


@pytest.fixture(scope="session")
def trained_classifier(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished (tiny) train_classifier run (with EMA weights): the Standard model of later stages."""
    workdir = tmp_path_factory.mktemp("classifier")
    run_dir = workdir / "run"
    cmd = recipe_command("train_classifier.py", ["--preset", "debug", f"data.root={demo_root}", f"run_dir={run_dir}",
                                                 "runtime.ema_decay=0.9"], nproc=1)
    proc = subprocess.run(cmd, cwd=workdir, env=recipe_env(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
