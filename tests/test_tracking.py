"""MLflow tracking: a real server receives a pipeline's nested stage runs; training survives
an unreachable or dying server, keeping the metrics locally."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from disttrain.runtime.tracking import Tracker
from tests.conftest import VENV_BIN, free_port


class MlflowServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = (workdir / "mlflow-server.log").open("w")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir}/server.db",
             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not start; see {self.log.name}")

    def stop(self) -> None:
        """Stop the server and the worker it started, by PID."""
        if self.proc.poll() is None:
            children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in children:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def disttrain_cli(*args: str, env: dict) -> str:
    proc = subprocess.run([str(VENV_BIN / "disttrain"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_pipeline_parent_run_with_nested_stage_runs_on_a_server(mlflow_server, launch, demo_root):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    parent = disttrain_cli("pipeline", "start", "demo-pipeline", "--experiment", "ci", env=env)
    stage_env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "DISTTRAIN_PARENT_RUN_ID": parent}
    for name in ("stage-a", "stage-b"):
        done = launch("train_classifier.py", "--preset", "debug", f"data.root={demo_root}", "tracking.experiment=ci",
                      f"tracking.run_name={name}", nproc=1, run_dir=demo_root.parent / f"run-{name}", env=stage_env)
        assert done.returncode == 0, done.output[-3000:]
        assert "failed" not in done.output.lower()
    disttrain_cli("pipeline", "end", parent, env=env)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ci")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["stage-a", "stage-b"]
    assert client.get_run(parent).info.status == "FINISHED"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.name"] == "resnet10t" and child.data.tags["disttrain.stage"] == "train_classifier"
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == [2, 4, 6]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "summary.json", "model"} <= artifacts


@pytest.mark.slow
def test_training_goes_on_when_the_server_is_unreachable(launch, demo_root, mlflow_server):
    dead = f"http://127.0.0.1:{free_port()}"
    done = launch("train_classifier.py", "--preset", "debug", f"data.root={demo_root}", nproc=1,
                  env={"MLFLOW_TRACKING_URI": dead})
    assert done.returncode == 0, done.output[-3000:]
    record = done.run_dir / "tracking" / "metrics.jsonl"
    assert "training goes on and metrics are kept in" in done.output and str(record) in done.output
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert [e["step"] for e in entries if e["event"] == "metrics" and "train/loss" in e["metrics"]] == [2, 4, 6]
    assert done.status()["state"] == "finished"

    # later, with a server up again, the record is replayed into it
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    out = disttrain_cli("mlflow-sync", str(done.run_dir), env=env)
    run_id = out.split()[-1]
    assert len(MlflowClient(mlflow_server.uri).get_metric_history(run_id, "train/loss")) == 3


def test_tracker_survives_the_server_dying_mid_run(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    tracker = Tracker(tmp_path / "tracking", "mid-run", "stage")
    assert tracker.online
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    server.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2, 5):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.finish()
    assert not tracker.online
    assert sum("metrics are kept in" in str(w.message) for w in caught) == 1  # warned once, not per call
    steps = [json.loads(line).get("step") for line in (tmp_path / "tracking" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4]
