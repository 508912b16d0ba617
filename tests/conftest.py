"""Shared fixtures: the demo dataset (generated once per session) and a launcher for recipes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster"]  # the single-host Slurm cluster fixture

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
