"""MLflow tracking: a real server receives a pipeline's nested stage runs; training survives
an unreachable or dying server, keeping the metrics locally; `disttrain mlflow-sync` later
completes the same MLflow run with exactly what never reached it, and a second sync sends nothing.

Outages are a real server stopped mid-run, or (cheaper, against one sqlite store shared by the
module) MlflowClient's calls failing for a while. Duplicates are counted as sent, not as stored:
a store may quietly drop an identical metric sent twice."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from disttrain import cli, files
from disttrain.runtime.liveness import StatusFile
from disttrain.runtime.run import dataset_digest
from disttrain.runtime.tracking import Tracker, start_pipeline
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
def test_pipeline_parent_run_with_nested_stage_runs_on_a_server(mlflow_server, launch, demo_root, monkeypatch):
    """A small pipeline (Standard -> OE fine-tuning -> evaluate -> report) as `mlflow ui` shows it: a
    model-training experiment, runs that say what they are, params that are the truth (against the
    saved cards and configs), the model logged and loadable, dataset inputs, system metrics, and the
    report's headline on the parent run."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    parent = disttrain_cli("pipeline", "start", "demo-pipeline", "--experiment", "ci", "--preset", "debug", env=env)
    stage_env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "DISTTRAIN_PARENT_RUN_ID": parent,
                 "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    run_dirs = {name: demo_root.parent / f"run-{name}" for name in ("standard", "oe", "evaluate", "report")}
    stages = {
        "standard": ("train_classifier.py", "--preset", "debug", f"data.root={demo_root}",
                     "tracking.register_as=ci-standard"),
        "oe": ("finetune_oe.py", "--preset", "debug", f"data.root={demo_root}", f"outliers.root={demo_root}/outliers",
               f"standard={run_dirs['standard']}", "method=oe", "train.max_steps=2"),
        "evaluate": ("evaluate.py", "--preset", "debug", f"model={run_dirs['oe']}", f"id={demo_root}/test",
                     f"ood=[{demo_root}/holdout,noise:gaussian:64]", "scorers=[msp]", "plots=false"),
        "report": ("report.py", f"evaluations=[{run_dirs['evaluate']}]", "plots=false"),
    }
    for name, (recipe, *args) in stages.items():
        done = launch(recipe, *args, "tracking.experiment=ci", f"tracking.run_name={name}", nproc=1,
                      run_dir=run_dirs[name], env=stage_env)
        assert done.returncode == 0, done.output[-3000:]
        assert "failed" not in done.output.lower()
    disttrain_cli("pipeline", "end", parent, env=env)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ci")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert "mlflow.note.content" in experiment.tags
    children = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id],
                                                                f"tags.mlflow.parentRunId = '{parent}'")}
    assert sorted(children) == sorted(stages)
    cards = {name: json.loads((run_dirs[name] / "model" / "model.json").read_text()) for name in ("standard", "oe")}
    for name, child in children.items():
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        stage = json.loads((run_dirs[name] / "config.json").read_text())["stage"]
        assert tags["disttrain.stage"] == stage and tags["mlflow.note.content"].startswith(stage)
        assert "Result:" in tags["mlflow.note.content"]
        assert tags["disttrain.seed"] == "0" and tags["disttrain.world_size"] == "1"
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].startswith("recipes/")
        assert tags["mlflow.user"] and len(tags.get("mlflow.source.git.commit", "")) == 40
        # params: the resolved config as the stage ran it, set values never empty
        assert params["tracking.parent_run_id"] == parent and params["tracking.run_name"] == name
        config = json.loads((run_dirs[name] / "config.json").read_text())["config"]
        for key, value in config.items():
            if key in params and not key.startswith(("tracking.", "model.")):
                assert params[key] == str(value), key
    assert {children[n].data.tags["disttrain.method"] for n in stages} == {"standard", "oe"}
    assert children["standard"].data.tags["disttrain.preset"] == "debug"
    assert children["standard"].data.tags["disttrain.dataset"] == demo_root.name
    # a fine-tuned model logs the model it trains (the Standard's card), and only its method's section
    oe = children["oe"].data.params
    assert oe["model.name"] == cards["standard"]["arguments"]["name"] == cards["oe"]["arguments"]["name"]
    assert oe["model.from_stage"] == "train_classifier" and "model.pretrained" not in oe
    assert "oe.beta" in oe and not [k for k in oe if k.startswith(("mixup_oe.", "energy_oe."))]
    assert not [k for k in children["report"].data.params if k.startswith("runtime.")]
    assert "runtime.ema_decay" not in children["evaluate"].data.params

    # the final weights as an MLflow model, registered, loadable back: the same predictions
    from disttrain.runtime.saved import load_logged_model, load_saved_classifier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    logged, card = load_logged_model(f"runs:/{children['standard'].info.run_id}/model")
    saved, _ = load_saved_classifier(run_dirs["standard"])
    images = torch.randn(4, 3, card.image_size, card.image_size)
    assert card.to_dict() == cards["standard"] and torch.equal(logged(images), saved(images))
    assert [v.run_id for v in client.search_model_versions("name = 'ci-standard'")] == \
        [children["standard"].info.run_id]
    # dataset inputs: the splits read, by their manifests' digests
    inputs = {(i.dataset.name, i.tags[0].value): i.dataset for i in children["oe"].inputs.dataset_inputs}
    train_manifest = json.loads((demo_root / "train" / "manifest.json").read_text())
    assert inputs[(f"train: {demo_root.name}/train", "training")].digest == dataset_digest(train_manifest, "")
    assert (f"outliers: {demo_root.name}/outliers", "training") in inputs
    contexts = sorted(i.tags[0].value for i in children["evaluate"].inputs.dataset_inputs)
    assert contexts == ["evaluation"] * 3
    # system metrics; data counters only as totals when nothing was damaged; results as an MLflow table
    standard_metrics = children["standard"].data.metrics
    assert any(key.startswith("system/cpu") for key in standard_metrics)
    assert "data/total/served_samples" in standard_metrics and "data/corrupt_samples" not in standard_metrics
    evaluate = children["evaluate"]
    assert json.loads(evaluate.data.tags["mlflow.loggedArtifacts"]) == [{"path": "results_table.json",
                                                                       "type": "table"}]
    assert "results_table.json" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}

    # the parent: what the pipeline ran, and the report's headline
    top = client.get_run(parent)
    assert top.info.status == "FINISHED" and top.data.tags["mlflow.note.content"].startswith("Pipeline demo-pipeline")
    assert "Result: 1 evaluation(s); best mean AUROC" in top.data.tags["mlflow.note.content"]
    assert top.data.params["pipeline.preset"] == "debug" and top.data.params["pipeline.methods"] == "standard,oe"
    assert top.data.params["pipeline.stages"] == "train_classifier,finetune_oe,evaluate,report"
    assert [k for k in top.data.metrics if k.startswith("headline/")] and \
        top.data.metrics[f"headline/{demo_root.name}/OE fine-tune/auroc"] == \
        children["report"].data.metrics[f"headline/{demo_root.name}/OE fine-tune/auroc"]
    assert {"headline.json", "table5.md"} <= {a.path for a in client.list_artifacts(parent)}


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

    # later, with a server up again, the record is sent to it: the run is made once, and named in run.json
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    assert "sent" in disttrain_cli("mlflow-sync", str(done.run_dir), env=env)
    run_id = json.loads((done.run_dir / "tracking" / "sync.json").read_text())["run_id"]
    assert done.json("run.json")["mlflow_run_id"] == run_id
    client = MlflowClient(mlflow_server.uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "already in sync" in disttrain_cli("mlflow-sync", str(done.run_dir), env=env)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_tracker_survives_the_server_dying_mid_run_and_sync_completes_its_run(tmp_path, monkeypatch, capsys):
    server = MlflowServer(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    tracker = Tracker(tmp_path / "run" / "tracking", "mid-run", "stage")
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
    assert [e.get("step") for e in record(tmp_path / "run") if e.get("step")] == [1, 2, 3, 4]

    # the server back (same store, another port): the same run is completed, once
    server = MlflowServer(tmp_path)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        assert f"run {tracker.run_id} (FINISHED)" in mlflow_sync(tmp_path / "run", capsys)
        client = MlflowClient(server.uri)
        assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("mid-run").experiment_id])] \
            == [tracker.run_id]
        assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3, 4]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert "already in sync" in mlflow_sync(tmp_path / "run", capsys)
        assert len(client.get_metric_history(tracker.run_id, "loss")) == 4
    finally:
        server.stop()


# --------------------------------------------------------------------------- mlflow-sync against a local store


def record(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tracking" / "metrics.jsonl").read_text().splitlines()]


def mlflow_sync(run_dir: Path, capsys: pytest.CaptureFixture) -> str:
    """`disttrain mlflow-sync run_dir` (the CLI entry point, in this process); its stdout."""
    capsys.readouterr()
    cli.main(["mlflow-sync", str(run_dir)])
    return capsys.readouterr().out


def mlflow_sync_error(run_dir: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mlflow-sync", str(run_dir)])
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # one store for the module: making a sqlite store's tables takes seconds; each test has its own experiment
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def store(store_uri, monkeypatch, request) -> tuple[MlflowClient, str]:
    """(client, experiment name) on the module's store, which MLFLOW_TRACKING_URI names for the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    return MlflowClient(store_uri), request.node.name


@pytest.fixture
def sent(monkeypatch) -> collections.Counter:
    """(run id, metric, step) -> how many times it was sent to MLflow, by the tracker or by mlflow-sync."""
    counts: collections.Counter = collections.Counter()
    original = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        out = original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        counts.update((run_id, m.key, m.step) for m in metrics)
        return out

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return counts


@contextlib.contextmanager
def mlflow_down(monkeypatch: pytest.MonkeyPatch):
    """Every MLflow call fails, as with a server gone, until the block ends."""
    def down(*_args, **_kwargs):
        raise ConnectionError("simulated MLflow outage")

    with monkeypatch.context() as patch, pytest.warns(RuntimeWarning, match="metrics are kept in"):
        for name in ("get_experiment_by_name", "create_experiment", "create_run", "get_run", "update_run",
                     "log_batch", "log_artifact", "set_terminated", "log_inputs", "create_logged_model",
                     "search_logged_models", "log_model_artifacts", "finalize_logged_model", "log_outputs"):
            patch.setattr(MlflowClient, name, down)
        yield


def runs_of(client: MlflowClient, experiment: str) -> list[str]:
    exp = client.get_experiment_by_name(experiment)
    return [r.info.run_id for r in client.search_runs([exp.experiment_id])] if exp else []


@pytest.mark.parametrize("end", ["FINISHED", "KILLED", "FAILED", None])
def test_sync_after_an_outage_mid_run_completes_the_same_run_once(end, store, sent, tmp_path, monkeypatch, capsys):
    client, experiment = store
    run_dir = tmp_path / "run"
    (run_dir / "summary.json").parent.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    tracker = Tracker(run_dir / "tracking", experiment, "stage", tags={"disttrain.stage": "demo"})
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    with mlflow_down(monkeypatch):
        for step in range(2, 6):
            tracker.log_metrics({"loss": 1.0 / step, "acc": step / 10}, step=step)
        tracker.set_tags({"disttrain.preempted_at_step": "5"})
        tracker.log_artifact(run_dir / "summary.json")
        if end:
            tracker.finish(end)
    assert not tracker.online
    run_dir = run_dir.rename(tmp_path / "moved")  # e.g. synced on a host that mounts it elsewhere
    watermark = run_dir / "tracking" / "sync.json"  # start, params, step 1: then MLflow went away
    before_sync = json.loads(watermark.read_text())

    out = mlflow_sync(run_dir, capsys)
    assert f"run {tracker.run_id} ({end or 'RUNNING'})" in out
    assert runs_of(client, experiment) == [tracker.run_id]  # the same run, not a second one
    history = client.get_metric_history(tracker.run_id, "loss")
    recorded = {e["step"]: int(e["time"] * 1000) for e in record(run_dir) if e["event"] == "metrics"}
    assert [(m.step, m.timestamp) for m in history] == sorted(recorded.items())  # original steps and times
    assert [m.step for m in client.get_metric_history(tracker.run_id, "acc")] == [2, 3, 4, 5]
    assert set(sent.values()) == {1}  # each value sent once, live or by the sync
    run = client.get_run(tracker.run_id)
    assert run.info.status == (end or "RUNNING")
    assert run.data.tags["disttrain.preempted_at_step"] == "5" and run.data.params == {"lr": "0.1"}
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["summary.json"]

    before = sum(sent.values())
    assert "already in sync" in mlflow_sync(run_dir, capsys)
    assert sum(sent.values()) == before and runs_of(client, experiment) == [tracker.run_id]
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 5
    assert before_sync == {"run_id": tracker.run_id, "synced": 3}
    assert json.loads(watermark.read_text()) == {"run_id": tracker.run_id, "synced": len(record(run_dir))}


def test_a_resumed_stage_that_reaches_mlflow_sends_the_gap_first(store, sent, tmp_path, monkeypatch, capsys):
    client, experiment = store
    first = Tracker(tmp_path / "tracking", experiment, "stage")
    first.log_metrics({"loss": 1.0}, step=1)
    with mlflow_down(monkeypatch):
        for step in (2, 3):
            first.log_metrics({"loss": 1.0 / step}, step=step)
        first.finish("KILLED")  # pre-empted while MLflow was down

    again = Tracker(tmp_path / "tracking", experiment, "stage", resume_run_id=first.run_id)
    assert again.online and again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"  # the gap's KILLED was sent, then it resumed
    again.log_metrics({"loss": 0.25}, step=4)
    again.finish()
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4]
    assert set(sent.values()) == {1}
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert json.loads((tmp_path / "tracking" / "sync.json").read_text())["synced"] == len(record(tmp_path))
    assert "already in sync" in mlflow_sync(tmp_path, capsys)
    assert runs_of(client, experiment) == [first.run_id]


def test_a_stage_resumed_offline_is_synced_into_its_run_and_left_running(store, sent, tmp_path, monkeypatch, capsys):
    client, experiment = store
    first = Tracker(tmp_path / "tracking", experiment, "stage")
    first.log_metrics({"loss": 1.0}, step=1)
    with mlflow_down(monkeypatch):
        first.log_metrics({"loss": 0.5}, step=2)
        first.finish("KILLED")
        again = Tracker(tmp_path / "tracking", experiment, "stage", resume_run_id=first.run_id)
        again.log_metrics({"loss": 0.25}, step=3)  # still training
    assert again.run_id == first.run_id and record(tmp_path)[-2]["run_id"] == first.run_id

    assert f"run {first.run_id} (RUNNING)" in mlflow_sync(tmp_path, capsys)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3]
    assert set(sent.values()) == {1} and runs_of(client, experiment) == [first.run_id]
    again.log_metrics({"loss": 0.125}, step=4)  # the stage goes on offline; the next sync sends only that
    assert "sent 1 events" in mlflow_sync(tmp_path, capsys)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3, 4]
    assert set(sent.values()) == {1}


def test_sync_after_an_outage_from_the_start_makes_the_run_once(store, sent, tmp_path, monkeypatch, capsys):
    client, experiment = store
    parent = start_pipeline("pipeline", experiment=f"{experiment}-pipelines")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"stage": "demo", "mlflow_run_id": ""}))  # as run.py leaves it
    tags = {"disttrain.stage": "demo", "disttrain.run_dir": str(run_dir)}
    with mlflow_down(monkeypatch):
        tracker = Tracker(run_dir / "tracking", experiment, "demo:run", parent_run_id=parent, tags=tags)
        tracker.log_params({"lr": 0.1})
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.finish()
    assert tracker.run_id == "" and not (run_dir / "tracking" / "sync.json").exists()

    mlflow_sync(run_dir, capsys)
    runs = runs_of(client, experiment)
    assert len(runs) == 1
    run = client.get_run(runs[0])
    assert run.info.run_name == "demo:run" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and tags.items() <= run.data.tags.items()
    assert run.info.start_time == int(record(run_dir)[0]["time"] * 1000)
    assert run.data.params == {"lr": "0.1"}
    assert [m.step for m in client.get_metric_history(runs[0], "loss")] == [1, 2, 3]
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == runs[0]  # a resume continues it
    assert json.loads((run_dir / "tracking" / "sync.json").read_text())["run_id"] == runs[0]

    assert "already in sync" in mlflow_sync(run_dir, capsys)
    assert runs_of(client, experiment) == runs and set(sent.values()) == {1}


def test_sync_names_a_run_that_was_deleted_or_is_not_in_the_store(store, tmp_path, monkeypatch, capsys):
    client, experiment = store
    tracker = Tracker(tmp_path / "deleted" / "tracking", experiment, "stage")
    with mlflow_down(monkeypatch):
        tracker.log_metrics({"loss": 1.0}, step=1)
    client.delete_run(tracker.run_id)
    code, err = mlflow_sync_error(tmp_path / "deleted", capsys)
    assert code == 2 and tracker.run_id in err and client.tracking_uri in err and "deleted" in err

    elsewhere = "0123456789abcdef0123456789abcdef"  # a run of another store
    with mlflow_down(monkeypatch):
        resumed = Tracker(tmp_path / "elsewhere" / "tracking", experiment, "stage", resume_run_id=elsewhere)
        resumed.log_metrics({"loss": 1.0}, step=1)
    code, err = mlflow_sync_error(tmp_path / "elsewhere", capsys)
    assert code == 2 and elsewhere in err and client.tracking_uri in err and "another store" in err


def test_sync_of_a_dir_without_a_record_is_a_clear_error(tmp_path, capsys):
    code, err = mlflow_sync_error(tmp_path, capsys)
    assert code == 2 and "metrics.jsonl does not exist" in err and str(tmp_path) in err


def test_sync_refuses_while_the_stage_is_alive(store, tmp_path, monkeypatch, capsys):
    """Its live tracker owns the watermark. Once the stage has ended, or died (kill -9), sync goes."""
    _client, experiment = store
    tracker = Tracker(tmp_path / "tracking", experiment, "stage")
    with mlflow_down(monkeypatch):
        tracker.log_metrics({"loss": 1.0}, step=1)
    status = StatusFile(tmp_path, "demo", writer=True, heartbeat_s=30)
    status.set("running")  # by this process
    code, err = mlflow_sync_error(tmp_path, capsys)
    assert code == 2 and "still running" in err and f"pid {os.getpid()}" in err

    dead = subprocess.Popen(["true"])
    dead.wait()
    files.write_json(tmp_path / "status.json", {**status.doc, "pid": dead.pid})  # 'running', by a dead process
    assert f"sent 1 events of {tmp_path}" in mlflow_sync(tmp_path, capsys)
    assert "already in sync" in mlflow_sync(tmp_path, capsys)


def test_a_record_without_a_watermark_is_synced_from_the_start_into_its_run(store, sent, tmp_path, capsys):
    """A record of the tracker before sync.json: its start event names the run; nothing says what reached it."""
    client, experiment = store
    run_id = client.create_run(client.create_experiment(experiment), run_name="stage").info.run_id
    now = time.time()
    lines = [{"time": now, "event": "start", "run_id": run_id, "experiment": experiment, "run_name": "stage",
              "parent_run_id": ""},
             {"time": now, "event": "params", "params": {"lr": 0.1}}]
    lines += [{"time": now + step, "event": "metrics", "step": step, "metrics": {"loss": 1.0 / step}}
              for step in (1, 2)]
    lines.append({"time": now + 5, "event": "finish", "status": "FINISHED"})
    (tmp_path / "tracking").mkdir()
    (tmp_path / "tracking" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))

    assert f"run {run_id} (FINISHED)" in mlflow_sync(tmp_path, capsys)
    assert runs_of(client, experiment) == [run_id] and client.get_run(run_id).data.params == {"lr": "0.1"}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert json.loads((tmp_path / "tracking" / "sync.json").read_text()) == {"run_id": run_id, "synced": len(lines)}
    assert "already in sync" in mlflow_sync(tmp_path, capsys) and set(sent.values()) == {1}


@pytest.mark.parametrize("made_by", ["the stage", "mlflow-sync"])
def test_a_stage_resumed_without_a_run_id_continues_the_run_of_the_one_before(made_by, store, sent, tmp_path,
                                                                               monkeypatch, capsys):
    """MLflow down when the stage started (no run id in run.json), then pre-empted twice: one run, not
    three, made by the third process if MLflow is back by then, else by mlflow-sync."""
    client, experiment = store
    with mlflow_down(monkeypatch):
        first = Tracker(tmp_path / "tracking", experiment, "stage")
        first.log_metrics({"loss": 1.0}, step=1)
        first.finish("KILLED")
        second = Tracker(tmp_path / "tracking", experiment, "stage", resuming=True)
        second.log_metrics({"loss": 0.5}, step=2)
        second.finish("KILLED")
    assert first.run_id == second.run_id == ""
    with mlflow_down(monkeypatch) if made_by == "mlflow-sync" else contextlib.nullcontext():
        third = Tracker(tmp_path / "tracking", experiment, "stage", resuming=True)
        third.log_metrics({"loss": 0.25}, step=3)
        third.finish()
    assert third.online == (made_by == "the stage")
    if made_by == "mlflow-sync":
        mlflow_sync(tmp_path, capsys)
    runs = runs_of(client, experiment)
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0], "loss")] == [1, 2, 3]
    assert set(sent.values()) == {1} and client.get_run(runs[0]).info.status == "FINISHED"
    assert client.get_run(runs[0]).info.start_time == int(record(tmp_path)[0]["time"] * 1000)
    assert "already in sync" in mlflow_sync(tmp_path, capsys)
    assert runs_of(client, experiment) == runs


def test_a_sync_cut_short_goes_on_where_it_stopped(store, sent, tmp_path, monkeypatch, capsys):
    client, experiment = store
    tracker = Tracker(tmp_path / "tracking", experiment, "stage")
    tracker.log_metrics({"loss": 1.0}, step=1)
    with mlflow_down(monkeypatch):
        for step in (2, 3, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
            tracker.set_tags({"last_step": str(step)})
        tracker.finish()
    spy, calls = MlflowClient.log_batch, []

    def flaky(self, *args, **kwargs):  # the server goes away again after one call
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("simulated MLflow outage")
        return spy(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", flaky)
        code, err = mlflow_sync_error(tmp_path, capsys)
    assert code == 1 and "failed with 1 of 7 events sent" in err and "again" in err
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2]
    assert f"run {tracker.run_id} (FINISHED)" in mlflow_sync(tmp_path, capsys)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3, 4]
    assert set(sent.values()) == {1} and client.get_run(tracker.run_id).data.tags["last_step"] == "4"


def test_a_param_recorded_again_with_another_value_does_not_stall_the_sync(store, tmp_path, monkeypatch, capsys):
    client, experiment = store
    tracker = Tracker(tmp_path / "tracking", experiment, "stage")
    tracker.log_params({"lr": 0.1})
    with mlflow_down(monkeypatch):
        tracker.log_params({"lr": 0.2, "data.num_samples": 10})  # e.g. a resume with a changed config
        tracker.log_metrics({"loss": 1.0}, step=1)
    out = mlflow_sync(tmp_path, capsys)
    assert "params lr not sent" in out and f"run {tracker.run_id} (RUNNING)" in out
    assert client.get_run(tracker.run_id).data.params == {"lr": "0.1", "data.num_samples": "10"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1]


def test_the_watermark_counts_every_event_when_two_threads_log(store, tmp_path, capsys):
    """The run's watchdog thread may tag and finish the run while the main thread logs."""
    _client, experiment = store
    tracker = Tracker(tmp_path / "tracking", experiment, "stage")

    def log(offset: int) -> None:
        for step in range(20):
            tracker.log_metrics({f"loss{offset}": 1.0}, step=step)

    threads = [threading.Thread(target=log, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tracker.finish()
    assert json.loads((tmp_path / "tracking" / "sync.json").read_text())["synced"] == len(record(tmp_path)) == 42
    assert "already in sync" in mlflow_sync(tmp_path, capsys)


def test_inputs_and_a_model_logged_offline_reach_the_run_with_the_sync(store, tmp_path, monkeypatch, capsys):
    """Dataset inputs, the logged model (and its registration) and the description go through the
    record like metrics: an outage loses none of them, a second sync repeats none."""
    from safetensors.torch import save_file

    from disttrain.models.cards import build_network, classifier_card
    from disttrain.runtime.saved import load_logged_model

    client, experiment = store
    run_dir = tmp_path / "run"
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True)
    card = classifier_card({"name": "resnet10t", "drop_rate": 0.0, "stem": "small"}, 3, ["a", "b", "c"], 8, 8,
                           stage="train_classifier")
    files.write_json(model_dir / "model.json", card.to_dict())
    network = build_network(card).eval()
    save_file(network.state_dict(), model_dir / "model.safetensors")
    tracker = Tracker(run_dir / "tracking", experiment, "stage", system_metrics=True)
    assert tracker._monitor is not None  # on while online
    with mlflow_down(monkeypatch):
        tracker.log_dataset("train: demo/train", "0123456789abcdef", "/data/demo/train", "training",
                            {"num_samples": 10})
        tracker.log_model(model_dir, ["model.safetensors", "model.json"], register_as=f"{experiment}-model")
        tracker.set_tags({"mlflow.note.content": "a stage. Result: fine."})
        tracker.finish()
    assert f"run {tracker.run_id} (FINISHED)" in mlflow_sync(run_dir, capsys)
    run = client.get_run(tracker.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest, dataset.tags[0].value) == \
        ("train: demo/train", "0123456789abcdef", "training")
    assert run.data.tags["mlflow.note.content"] == "a stage. Result: fine."
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    loaded, loaded_card = load_logged_model(f"runs:/{tracker.run_id}/model")
    images = torch.randn(2, 3, 8, 8)
    assert loaded_card == card and torch.equal(loaded(images), network(images))
    assert [v.run_id for v in client.search_model_versions(f"name = '{experiment}-model'")] == [tracker.run_id]
    experiment_id = run.info.experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "already in sync" in mlflow_sync(run_dir, capsys)
    assert len(client.search_logged_models([experiment_id])) == 1
