"""MLflow tracking that never stops training, and `disttrain mlflow-sync` to complete it later.

Only rank 0 builds a `Tracker`; other ranks get a `NullTracker`. With `tracking.enabled=false`
the tracker keeps the local record and never contacts MLflow.

- Every event is first appended to `<run_dir>/tracking/metrics.jsonl` (the record), then sent.
  If MLflow cannot be reached, at start or mid-run, the tracker warns once and goes on offline.
- `tracking/sync.json` = `{"run_id": ..., "synced": N}`: the record's first N lines are in MLflow.
  The online tracker moves N after each log call that succeeded; offline, never.
- One MLflow run per run dir: the one sync.json names, else run.json's `mlflow_run_id`, else the
  record's first start event with a run id. Every process of the stage appends to the record and
  continues that run; if none reached MLflow, the first start event that does makes the run (with
  that process's name, tags and parent run).
- `disttrain mlflow-sync <run_dir>` (`sync`) sends lines N.. in order, metrics with their recorded
  steps and timestamps, moving N after each call: a second sync sends nothing, one cut short goes
  on. It refuses while the stage is alive (its tracker owns N). A process of the stage that reaches
  MLflow sends what earlier ones left undelivered the same way, before its own events.

What the record holds beyond metrics, params, tags and artifacts is sent the same way: dataset
inputs (`dataset`: name, digest, source) and the stage's saved model (`model`: its files become an
MLflow logged model of the run, `runs:/<run id>/model`, registered when asked); a resent model
event completes the logged model it made. MLflow's system metrics are the exception: sampled live
by MLflow's own monitor while the tracker is online, never recorded, so a stage run offline has none.

A record written before sync.json existed is synced from line 0 into its run: what the old tracker
delivered is sent again; a metric may then appear twice (MLflow's SQL stores drop only a row
identical in value, step and timestamp).

With nothing configured MLflow 3 uses `sqlite:///mlflow.db` (+ `./mlruns` for artifacts) in the
working directory; `MLFLOW_TRACKING_URI` points at a server. A pipeline is one parent run
(`start_pipeline`) whose id the stages receive through `tracking.parent_run_id=` or
`DISTTRAIN_PARENT_RUN_ID`; each stage is a nested run.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from disttrain import files

PARENT_ENV = "DISTTRAIN_PARENT_RUN_ID"
# MLflow 3 opens an experiment by its kind: without it, on the GenAI overview instead of the runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DESCRIPTION_TAG = "mlflow.note.content"  # the description the UI shows on a run's (or experiment's) page
EXPERIMENT_DESCRIPTION = ("disttrain runs: one parent run per pipeline (`disttrain pipeline start`), one nested run "
                          "per stage. A stage's page has its description, resolved params, dataset inputs, the "
                          "logged model, its curves and system metrics; the pipeline's run has the report's "
                          "headline table.")
_MAX_PARAM_LEN = 6000
_MAX_BATCH_METRICS = 1000  # MLflow's log_batch limits
_MAX_BATCH_PARAMS = 100  # params, and tags

Event = dict[str, Any]  # one line of the record


def _quick_http_failure() -> None:
    # MLflow's defaults retry an unreachable server for minutes; a trainer should notice fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


# --------------------------------------------------------------------------- the record and its watermark


def _read_record(path: Path) -> list[Event | None]:
    """The record's events, one per line; None for a line that is not one (cut short by a crash)."""
    events: list[Event | None] = []
    for line in path.read_bytes().split(b"\n")[:-1]:  # after the last newline: a line still being written
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        events.append(entry if isinstance(entry, dict) and "event" in entry else None)
    return events


def _load_state(tracking_dir: Path, events: list[Event | None], run_id: str = "") -> dict[str, Any]:
    """sync.json (nothing delivered if there is none, or it is unreadable), with the run dir's run
    filled in when it names none: `run_id` if given, else run.json's, else the record's."""
    try:
        state = json.loads((tracking_dir / "sync.json").read_text())
    except (OSError, ValueError):
        state = {"run_id": "", "synced": 0}
    info_path = tracking_dir.parent / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    recorded = [e["run_id"] for e in events if e and e["event"] == "start" and e.get("run_id")]
    state["run_id"] = state["run_id"] or run_id or info.get("mlflow_run_id") or (recorded[0] if recorded else "")
    return state


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name`, made if missing as a model-training experiment with a description;
    an existing one without a kind gets it (and the description, if it has none)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={**EXPERIMENT_KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION})
    missing = {**EXPERIMENT_KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}
    for key, value in missing.items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _note(text: str) -> None:
    print(f"note: {text}", flush=True)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _metrics_batch_end(events: list[Event | None], first: int, stop: int) -> int:
    """Where the metrics events from line `first` on stop, or would not fit in one log_batch."""
    end, count = first, 0
    while end < stop and events[end] and events[end]["event"] == "metrics":
        count += len(events[end]["metrics"])
        if count > _MAX_BATCH_METRICS and end > first:
            break
        end += 1
    return end


class _Sender:
    """Sends record events into the run dir's run, one method per event kind, and keeps the
    watermark: the first `synced` lines are in MLflow; `save` writes it to sync.json."""

    def __init__(self, client: Any, tracking_dir: Path, state: dict[str, Any]):
        self.client = client
        self.run_dir = tracking_dir.parent
        self.sync_file = tracking_dir / "sync.json"
        self.run_id: str = state["run_id"]
        self.synced: int = state["synced"]

    def save(self) -> None:
        files.write_json(self.sync_file, {"run_id": self.run_id, "synced": self.synced})

    def send_from_watermark(self, events: list[Event | None], stop: int) -> None:
        """Send lines [synced, stop) in order, consecutive metrics in one batch, moving the
        watermark after each call that succeeded."""
        if self.run_id:
            self.check_run()
        while self.synced < stop:
            end = _metrics_batch_end(events, self.synced, stop)
            if end > self.synced:  # metrics lines, as many as one call takes
                self._metrics(events[self.synced:end])
            else:
                end = self.synced + 1
                if events[self.synced] is not None:  # None: a line cut short by a crash
                    self.send(self.synced, events[self.synced])
            self.synced = end
            self.save()

    def send(self, index: int, entry: Event) -> None:
        senders = {"start": self._start, "params": self._params, "tags": self._tags, "artifact": self._artifact,
                   "dataset": self._dataset, "model": self._model, "finish": self._finish}
        if entry["event"] == "metrics":
            self._metrics([entry])
        elif entry["event"] in senders:
            senders[entry["event"]](index, entry)
        else:
            _note(f"line {index + 1}: unknown event {entry['event']!r}, not sent")

    def check_run(self) -> None:
        """A clear error, before anything is sent, if the run is not in this store."""
        from mlflow.exceptions import MlflowException

        from disttrain.data.shards import DataError

        run, store = f"MLflow run {self.run_id} of {self.run_dir}", f"the tracking store {self.client.tracking_uri}"
        try:
            deleted = self.client.get_run(self.run_id).info.lifecycle_stage == "deleted"
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise DataError(f"{run} is not in {store}: it was deleted for good, or it lives in another store; "
                            f"point MLFLOW_TRACKING_URI at the store it was created in") from None
        if deleted:
            raise DataError(f"{run} was deleted from {store}; `mlflow runs restore --run-id {self.run_id}` to sync")

    # -- one method per event kind --------------------------------------------------------------

    def _start(self, _index: int, entry: Event) -> None:
        if self.run_id:  # a process of the stage began (again): the run goes on
            self.client.update_run(self.run_id, status="RUNNING")
            return
        # the stage never reached MLflow: make the run it would have made
        exp_id = experiment_id(self.client, entry["experiment"])
        tags = {k: str(v) for k, v in (entry.get("tags") or {}).items()}
        if entry.get("parent_run_id"):
            tags["mlflow.parentRunId"] = entry["parent_run_id"]
        self.run_id = self.client.create_run(exp_id, start_time=int(entry["time"] * 1000), tags=tags,
                                             run_name=entry["run_name"]).info.run_id
        self.save()  # at once: a sync cut short from here on must not make a second run

    def _params(self, index: int, entry: Event) -> None:
        from mlflow.entities import Param

        # MLflow keeps a param's first value and refuses another (a stage started again with a
        # changed config): leave those out rather than stall every sync to come
        logged = self.client.get_run(self.run_id).data.params
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in entry["params"].items()}
        changed = sorted(k for k, v in params.items() if logged.get(k, v) != v)
        if changed:
            _note(f"line {index + 1}: params {', '.join(changed)} not sent: the run has other values")
        items = [Param(k, v) for k, v in sorted(params.items()) if k not in changed]
        for chunk in _chunks(items, _MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=chunk)

    def _metrics(self, entries: list[Event]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(e["time"] * 1000), e["step"])
                   for e in entries for k, v in e["metrics"].items()]
        for chunk in _chunks(metrics, _MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk)

    def _tags(self, _index: int, entry: Event) -> None:
        from mlflow.entities import RunTag

        for chunk in _chunks([RunTag(k, str(v)) for k, v in entry["tags"].items()], _MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, tags=chunk)

    def _artifact(self, index: int, entry: Event) -> None:
        path = self.run_dir / entry["path"]  # recorded relative to the run dir, which may have moved since
        if not path.exists():
            _note(f"line {index + 1}: artifact {path} no longer exists, not sent")
            return
        self.client.log_artifact(self.run_id, str(path), entry.get("artifact_path"))

    def _dataset(self, _index: int, entry: Event) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(entry["name"], entry["digest"], "local", json.dumps({"uri": entry["source"]}),
                          profile=json.dumps(entry.get("profile") or {}))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context",
                                                                             entry["context"])])])

    def _model(self, index: int, entry: Event) -> None:
        """The saved model as an MLflow logged model of the run (`runs:/<run id>/<name>`): the files of
        the run dir's model folder as they are (safetensors and JSON, nothing pickled) beside an MLmodel
        file; registered under `register_as` when given. Sent again after a cut, it completes the
        model it made rather than make a second one."""
        from mlflow.entities import LoggedModelOutput

        source = self.run_dir / entry["path"]
        if not source.is_dir():
            _note(f"line {index + 1}: model {source} no longer exists, not sent")
            return
        run = self.client.get_run(self.run_id)
        name = entry["name"]
        made = [m for m in self.client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'")
                if m.source_run_id == self.run_id]
        model = made[0] if made else self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=self.run_id, tags=entry.get("tags") or {},
            params={k: str(v)[:_MAX_PARAM_LEN] for k, v in (entry.get("params") or {}).items()},
            model_type="disttrain")
        if model.status != "READY":  # a new one, or one a cut-short send left PENDING: upload and finalise
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                for file in entry["files"]:
                    shutil.copyfile(source / file, Path(tmp) / file)
                Path(tmp, "MLmodel").write_text(_mlmodel(self.run_id, model.model_id, name, entry))
                self.client.log_model_artifacts(model.model_id, tmp)
            self.client.finalize_logged_model(model.model_id, "READY")
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, entry.get("step", 0))])
        if entry.get("register_as"):
            _register(self.client, entry["register_as"], model, self.run_id)

    def _finish(self, _index: int, entry: Event) -> None:
        self.client.set_terminated(self.run_id, entry.get("status") or "FINISHED", end_time=int(entry["time"] * 1000))


def _mlmodel(run_id: str, model_id: str, name: str, entry: Event) -> str:
    """An MLmodel file for the logged model: its files and how disttrain loads them
    (disttrain.runtime.saved.load_logged_model); no python_function flavour, nothing to unpickle."""
    import yaml

    return yaml.safe_dump({
        "artifact_path": name, "run_id": run_id, "model_id": model_id,
        "utc_time_created": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime(entry["time"])),
        "flavors": {"disttrain": {"loader": "disttrain.runtime.saved.load_logged_model", "card": "model.json",
                                  "weights": "model.safetensors", "format": "safetensors"}},
    }, sort_keys=False)


def _register(client: Any, name: str, model: Any, run_id: str) -> None:
    """A version of registered model `name` for the logged model, once (a replay adds none)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "PERMISSION_DENIED"):
            _note(f"the model is logged but not registered as {name!r}: {str(err).splitlines()[0][:300]}")
            return
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if any(v.run_id == run_id for v in client.search_model_versions(f"name = '{name}'")):
        return
    try:
        client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model.model_id)
    except MlflowException as err:  # refused for good (a name the registry rejects): never stall the syncs to come
        if err.error_code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "PERMISSION_DENIED"):
            raise
        _note(f"the model is logged but not registered as {name!r}: {str(err).splitlines()[0][:300]}")


# --------------------------------------------------------------------------- trackers


class NullTracker:
    """What ranks other than 0 get: every call is a no-op."""

    run_id = ""
    online = False

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str,
                    profile: dict[str, Any] | None = None) -> None: ...
    def log_model(self, model_dir: str | os.PathLike, files: list[str], name: str = "model", register_as: str = "",
                  params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, step: int = 0) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """The run dir's MLflow run, mirrored into the record. `resume_run_id` names it where sync.json
    does not; `resuming` changes nothing: resumed or started again, a stage continues its run dir's run."""

    def __init__(self, local_dir: str | os.PathLike, experiment: str, run_name: str,
                 parent_run_id: str = "", resume_run_id: str = "", tags: dict[str, str] | None = None,
                 use_mlflow: bool = True, resuming: bool = False, system_metrics: bool = False):
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.record = self.local_dir / "metrics.jsonl"
        self.uri = ""
        self.online = False
        self._warned = False
        self._sender: _Sender | None = None
        self._monitor: Any = None  # MLflow's system metrics monitor (CPU, memory, GPU), while online
        # the watchdog thread may tag and finish the run while the main thread logs: line numbers and
        # N under a lock, never held while MLflow is called; a line delivered before an earlier one
        # waits in `_done` until that one is delivered too
        self._lock = threading.Lock()
        self._done: set[int] = set()
        events = self._open_record()
        self._next = len(events)  # the line the next event gets
        state = _load_state(self.local_dir, events, resume_run_id)
        self.run_id: str = state["run_id"]
        start = {"time": time.time(), "event": "start", "run_id": self.run_id, "experiment": experiment,
                 "run_name": run_name, "parent_run_id": parent_run_id, "tags": dict(tags or {})}
        self._append(start)
        events.append(start)
        if use_mlflow:
            self._connect(events, state)
        if system_metrics and self.online:
            self._start_system_metrics(resuming)

    def _open_record(self) -> list[Event | None]:
        if not self.record.exists():
            return []
        data = self.record.read_bytes()
        if data and not data.endswith(b"\n"):  # a line cut short by a crash stays a line of its own
            with self.record.open("ab") as f:
                f.write(b"\n")
        return _read_record(self.record)

    def _connect(self, events: list[Event | None], state: dict[str, Any]) -> None:
        _quick_http_failure()
        gap = len(events) - 1 - state["synced"]  # lines earlier processes left undelivered
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            self.uri = mlflow.get_tracking_uri()
            self._sender = _Sender(MlflowClient(self.uri), self.local_dir, state)
            self._sender.send_from_watermark(events, len(events))  # the gap first, then this start
            self.online = True
        except Exception as err:  # noqa: BLE001 -- any tracking failure must leave training running
            self._go_offline(err)
        if self._sender is not None:
            self.run_id = self._sender.run_id  # made just now, if the stage had none
        if self.online and gap > 0:
            print(f"tracking: sent {gap} events recorded while MLflow was unreachable to run {self.run_id}",
                  flush=True)

    def _start_system_metrics(self, resuming: bool) -> None:
        """MLflow's sampler of CPU, memory, disk, network (and GPU, with pynvml) in a daemon thread that
        logs `system/*` straight to the run: live only, never recorded; on any failure it stops itself."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resuming, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 -- psutil missing, a store that refuses: no system metrics
            _note(f"MLflow system metrics are off ({type(err).__name__}: {err})")
            self._monitor = None

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        # its last flush talks to MLflow: never wait on it for long (a server gone would hold the stage's end)
        ending = threading.Thread(target=monitor.finish, daemon=True, name="system-metrics-finish")
        ending.start()
        ending.join(timeout=10)

    def _append(self, entry: Event) -> int:
        """Write one event to the record; returns its line number."""
        line = json.dumps(entry, default=str) + "\n"
        with self._lock, self.record.open("a") as f:
            f.write(line)
            self._next += 1
            return self._next - 1

    def _log(self, event: Event) -> None:
        entry = {"time": time.time(), **event}  # one clock for the record and MLflow
        index = self._append(entry)
        if not self.online:
            return
        try:
            self._sender.send(index, entry)
        except Exception as err:  # noqa: BLE001
            self._go_offline(err)
            return
        with self._lock:  # line `index` is in MLflow: move N past it and every delivered line after it
            if self.online:
                self._done.add(index)
                while self._sender.synced in self._done:
                    self._done.remove(self._sender.synced)
                    self._sender.synced += 1
                self._sender.save()

    def _go_offline(self, err: Exception) -> None:
        self.online = False
        if self._warned:
            return
        self._warned = True
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        where = self.uri or os.environ.get("MLFLOW_TRACKING_URI", "the default local store")
        warnings.warn(
            f"MLflow tracking at {where} failed ({reason}); training goes on and metrics are kept in "
            f"{self.record}. Send them to MLflow later with `disttrain mlflow-sync {self.local_dir.parent}`.",
            RuntimeWarning, stacklevel=4,
        )

    # -- public -------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        self._log({"event": "params", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log({"event": "metrics", "step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path, run_dir = Path(path).resolve(), self.local_dir.parent.resolve()
        recorded = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
        self._log({"event": "artifact", "path": str(recorded), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._log({"event": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, name: str, digest: str, source: str, context: str,
                    profile: dict[str, Any] | None = None) -> None:
        """A dataset input of the run (MLflow's Datasets column): `context` training | evaluation | ..."""
        self._log({"event": "dataset", "name": name, "digest": digest, "source": source, "context": context,
                   "profile": profile or {}})

    def log_model(self, model_dir: str | os.PathLike, files: list[str], name: str = "model", register_as: str = "",
                  params: dict[str, Any] | None = None, tags: dict[str, str] | None = None, step: int = 0) -> None:
        """`files` of `model_dir` (in the run dir) as the run's logged model `name`, registered as
        `register_as` when given; see _Sender._model."""
        path, run_dir = Path(model_dir).resolve(), self.local_dir.parent.resolve()
        recorded = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
        self._log({"event": "model", "path": str(recorded), "files": list(files), "name": name,
                   "register_as": register_as, "params": params or {}, "tags": tags or {}, "step": step})

    def finish(self, status: str = "FINISHED") -> None:
        self._stop_system_metrics()
        self._log({"event": "finish", "status": status})


# --------------------------------------------------------------------------- pipelines


def start_pipeline(name: str, experiment: str = "disttrain", tags: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> str:
    """Create the parent run of a pipeline and return its id (used by `disttrain pipeline start`);
    `params` (preset, methods, seeds, stages: what the caller knows) become its params as `pipeline.*`."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    _quick_http_failure()
    client = MlflowClient()
    exp_id = experiment_id(client, experiment)
    known = {k: v for k, v in (params or {}).items() if v}
    description = (f"Pipeline {name}" + (f" ({', '.join(f'{k} {v}' for k, v in known.items())})" if known else "")
                   + ": one nested run per stage. When it ends (`disttrain pipeline end`) this run holds every "
                     "stage's wall clock and, from the report stage, the headline table (metrics `headline/*`, "
                     "artifact headline.json).")
    run_tags = {"disttrain.kind": "pipeline", **source_tags("disttrain pipeline"), DESCRIPTION_TAG: description,
                **(tags or {})}
    run_id = client.create_run(exp_id, run_name=name, tags=run_tags).info.run_id
    if known:
        client.log_batch(run_id, params=[Param(f"pipeline.{k}", str(v)[:_MAX_PARAM_LEN]) for k, v in known.items()])
    return run_id


def source_tags(source_name: str) -> dict[str, str]:
    """MLflow's own tags for who ran what from which commit ("Source", "Created by" and the commit in
    the UI): the user, the script (`source_name`), LOCAL or JOB (under Slurm), the git commit of this
    checkout when it is one."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": source_name, "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else
            "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 -- no user name for this uid (a container)
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        if len(commit) == 40:
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


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
    _summarise_pipeline(client, parent, sorted(children, key=lambda child: child.info.start_time))
    client.set_terminated(run_id, status)
    print(f"runs table: {runs_table_url(parent.info.experiment_id)}", flush=True)
    return times


def runs_table_url(experiment: str, tracking_uri: str = "") -> str:
    """The experiment's runs table in the UI. MLflow 3.17's UI opens every experiment on the
    "GenAI" side of its "GenAI | Model training" switch, whatever the experiment's kind tag says
    (the switch is always on in that version); `workflowType=machine_learning` opens the runs."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"  # `mlflow ui`
    return f"{base}/#/experiments/{experiment}?workflowType=machine_learning"


def _summarise_pipeline(client: Any, parent: Any, children: list[Any]) -> None:
    """What the pipeline ran, as the parent's params `pipeline.*` (those not given at its start), and
    the report stage's headline (its `headline/*` metrics, headline.json) on the parent, so that one
    page compares the methods."""
    import tempfile

    from mlflow.entities import Metric, Param

    def values(tag: str) -> str:
        return ",".join(dict.fromkeys(value for c in children for value in c.data.tags.get(tag, "").split(",")
                                      if value))

    found = {"pipeline.stages": values("disttrain.stage"), "pipeline.methods": values("disttrain.method"),
             "pipeline.seeds": values("disttrain.seed"), "pipeline.preset": values("disttrain.preset"),
             "pipeline.dataset": values("disttrain.dataset")}
    new = [Param(k, v[:_MAX_PARAM_LEN]) for k, v in found.items() if v and k not in parent.data.params]
    if new:
        client.log_batch(parent.info.run_id, params=new)
    for report in [c for c in children if c.data.tags.get("disttrain.stage") == "report"][-1:]:
        now = int(time.time() * 1000)
        headline = [Metric(k, v, now, 0) for k, v in report.data.metrics.items() if k.startswith("headline/")]
        for chunk in _chunks(headline, _MAX_BATCH_METRICS):
            client.log_batch(parent.info.run_id, metrics=chunk)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("headline.json", "table5.md"):
                try:
                    client.log_artifact(parent.info.run_id, client.download_artifacts(report.info.run_id, name, tmp))
                except Exception as err:  # noqa: BLE001 -- a report still offline: the parent goes without
                    _note(f"the report's {name} is not in MLflow ({type(err).__name__}); the parent run goes "
                          f"without it")
                    continue
                if name == "headline.json":  # an MLflow table, as on the report's run
                    client.set_tag(parent.info.run_id, "mlflow.loggedArtifacts",
                                   json.dumps([{"path": name, "type": "table"}]))
        result = report.data.tags.get(DESCRIPTION_TAG, "").partition(" Result: ")[2]
        if result:  # the description ends with the report's result, as a stage's does
            client.set_tag(parent.info.run_id, DESCRIPTION_TAG,
                           f"{parent.data.tags.get(DESCRIPTION_TAG, '')} Result: {result}")


# --------------------------------------------------------------------------- mlflow-sync


class SyncError(RuntimeError):
    """MLflow failed while `sync` was sending; what was sent is recorded, so running it again goes on."""


def sync(run_dir: str | os.PathLike) -> str:
    """Send a run dir's record from its watermark on to MLflow (MLFLOW_TRACKING_URI's, or the default
    store); notes are printed, what was done is returned. DataError: no record, the stage still running,
    a run deleted or not in this store; SyncError: MLflow failed midway."""
    from mlflow.tracking import MlflowClient

    from disttrain.data.shards import DataError
    from disttrain.runtime.liveness import read_status, run_report

    run_dir = Path(run_dir)
    tracking_dir = run_dir / "tracking"
    record = tracking_dir / "metrics.jsonl"
    if not record.is_file():
        raise DataError(f"{record} does not exist: {run_dir} is not a disttrain run dir, or its stage never started")
    report = run_report(run_dir)
    if report["state"] == "running" and report.get("alive"):
        status = read_status(run_dir)
        raise DataError(f"the stage of {run_dir} is still running (pid {status.get('pid')} on {status.get('host')}: "
                        f"{report['why']}), and syncing now would race its tracker: run mlflow-sync once it has ended")
    events = _read_record(record)
    state = _load_state(tracking_dir, events)
    if state["synced"] >= len(events):
        _name_run(run_dir, state["run_id"])
        return f"{run_dir} is already in sync: its {len(events)} recorded events are in MLflow run {state['run_id']}"
    _quick_http_failure()
    client = MlflowClient()
    sender = _Sender(client, tracking_dir, state)
    first = sender.synced
    try:
        sender.send_from_watermark(events, len(events))
        status = client.get_run(sender.run_id).info.status
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- anything MLflow raises: say what was done and how to go on
        first_line = str(err).splitlines()[0][:300] if str(err) else ""
        raise SyncError(f"MLflow at {client.tracking_uri} failed with {sender.synced - first} of "
                        f"{len(events) - first} events sent ({type(err).__name__}: {first_line}); what was sent is "
                        f"recorded in {sender.sync_file}: run `disttrain mlflow-sync {run_dir}` again") from err
    _name_run(run_dir, sender.run_id)
    return (f"sent {sender.synced - first} events of {run_dir} to MLflow at {client.tracking_uri}: "
            f"run {sender.run_id} ({status})")


def _name_run(run_dir: Path, run_id: str) -> None:
    # run.json names the stage's run for the next stage; one that never reached MLflow left it empty
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info and run_id and not info.get("mlflow_run_id"):
        files.write_json(info_path, {**info, "mlflow_run_id": run_id})
