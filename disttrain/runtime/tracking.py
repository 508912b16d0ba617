"""MLflow tracking that never stops training.

Only rank 0 builds a `Tracker`; every other rank gets a `NullTracker`. With
`tracking.enabled=false` the tracker keeps the local record and never contacts MLflow. Every metric is
first appended to `<run_dir>/tracking/metrics.jsonl` (the local record), then sent to
MLflow. If MLflow cannot be reached -- at start or mid-run -- the tracker warns once,
says where the local record is, and goes on offline; `disttrain mlflow-sync <run_dir>`
replays the record into MLflow later.

With nothing configured MLflow 3 uses `sqlite:///mlflow.db` (+ `./mlruns` for artifacts)
in the working directory; `MLFLOW_TRACKING_URI` points at a server. A pipeline is one
parent run (`start_pipeline`) whose id the stages receive through
`tracking.parent_run_id=` or `DISTTRAIN_PARENT_RUN_ID`; each stage is a nested run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_ENV = "DISTTRAIN_PARENT_RUN_ID"
_MAX_PARAM_LEN = 6000


def _quick_http_failure() -> None:
    # MLflow's defaults retry an unreachable server for minutes; a trainer should notice fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class NullTracker:
    """What ranks other than 0 get: every call is a no-op."""

    run_id = ""
    online = False

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One MLflow run for one stage, mirrored into a local JSONL record."""

    def __init__(self, local_dir: str | os.PathLike, experiment: str, run_name: str,
                 parent_run_id: str = "", resume_run_id: str = "", tags: dict[str, str] | None = None,
                 use_mlflow: bool = True):
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.record = self.local_dir / "metrics.jsonl"
        self.run_id = ""
        self.online = False
        self._warned = False
        self._client = None
        self.uri = ""
        if use_mlflow:
            self._connect(experiment, run_name, parent_run_id, resume_run_id, tags)
        self._write_local({"event": "start", "run_id": self.run_id, "experiment": experiment,
                           "run_name": run_name, "parent_run_id": parent_run_id})

    def _connect(self, experiment: str, run_name: str, parent_run_id: str, resume_run_id: str,
                 tags: dict[str, str] | None) -> None:
        _quick_http_failure()
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            self.uri = mlflow.get_tracking_uri()
            self._client = MlflowClient(self.uri)
            if resume_run_id:
                self.run_id = resume_run_id
                self._client.update_run(resume_run_id, status="RUNNING")
            else:
                exp = self._client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(experiment)
                all_tags = dict(tags or {})
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                self.run_id = self._client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
            self.online = True
        except Exception as err:  # noqa: BLE001 -- any tracking failure must leave training running
            self._go_offline(err)

    # -- local record -------------------------------------------------------------------------

    def _write_local(self, entry: dict[str, Any]) -> None:
        entry = {"time": time.time(), **entry}
        with self.record.open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def _go_offline(self, err: Exception) -> None:
        self.online = False
        if self._warned:
            return
        self._warned = True
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        warnings.warn(
            f"MLflow tracking at {os.environ.get('MLFLOW_TRACKING_URI', 'the default local store')} failed "
            f"({reason}); training goes on and metrics are kept in {self.record}. Replay them later "
            f"with `disttrain mlflow-sync {self.local_dir.parent}`.",
            RuntimeWarning, stacklevel=3,
        )

    def _send(self, fn_name: str, *args: Any, **kwargs: Any) -> None:
        if not self.online:
            return
        try:
            getattr(self._client, fn_name)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._go_offline(err)

    # -- public -------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._write_local({"event": "params", "params": params})
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._send("log_batch", self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        self._write_local({"event": "metrics", "step": step, "metrics": metrics})
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._send("log_batch", self.run_id, metrics=batch)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._write_local({"event": "artifact", "path": str(path), "artifact_path": artifact_path})
        self._send("log_artifact", self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write_local({"event": "tags", "tags": tags})
        for key, value in tags.items():
            self._send("set_tag", self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self._write_local({"event": "finish", "status": status})
        self._send("set_terminated", self.run_id, status)


def start_pipeline(name: str, experiment: str = "disttrain", tags: dict[str, str] | None = None) -> str:
    """Create the parent run of a pipeline and return its id (used by `disttrain pipeline-run`)."""
    from mlflow.tracking import MlflowClient

    _quick_http_failure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    return client.create_run(exp_id, run_name=name, tags={"disttrain.kind": "pipeline", **(tags or {})}).info.run_id


def end_pipeline(run_id: str, status: str = "FINISHED") -> dict[str, float]:
    """Close a pipeline's parent run. Logs to it, and returns, the wall clock of its stages:
    `stage_wall_clock_s/<run name>` per nested stage run, their sum `pipeline/stages_s`, and
    `pipeline/elapsed_s` from the parent's start (stages that ran at the same time overlap)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    times = {f"stage_wall_clock_s/{child.info.run_name}": child.data.metrics["stage_wall_clock_s"]
             for child in children if "stage_wall_clock_s" in child.data.metrics}
    times["pipeline/stages_s"] = sum(times.values())
    times["pipeline/elapsed_s"] = time.time() - parent.info.start_time / 1000.0
    client.log_batch(run_id, metrics=[Metric(key, value, int(time.time() * 1000), 0) for key, value in times.items()])
    client.set_terminated(run_id, status)
    return times


def replay(run_dir: str | os.PathLike) -> str:
    """Send a run dir's local record to MLflow as a new run; returns the new run id."""
    record = Path(run_dir) / "tracking" / "metrics.jsonl"
    if not record.exists():
        raise FileNotFoundError(f"{record} does not exist: is {run_dir} a disttrain run dir?")
    entries = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    start = next(e for e in entries if e["event"] == "start")
    tracker = Tracker(Path(run_dir) / "tracking" / "replay", start["experiment"],
                      start["run_name"] + " (replayed)", start.get("parent_run_id") or "")
    if not tracker.online:
        raise ConnectionError("MLflow is still unreachable; nothing replayed")
    for e in entries:
        if e["event"] == "params":
            tracker.log_params(e["params"])
        elif e["event"] == "metrics":
            tracker.log_metrics(e["metrics"], e["step"])
        elif e["event"] == "artifact" and Path(e["path"]).exists():
            tracker.log_artifact(e["path"], e["artifact_path"])
        elif e["event"] == "tags":
            tracker.set_tags(e["tags"])
    tracker.finish()
    return tracker.run_id
