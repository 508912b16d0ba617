"""A stage's run: accelerator, run dir, tracking, checkpoints, signals, seeds.

    run = start_run(cfg)                 # process group, run dir, MLflow, config saved
    model, opt = run.prepare(model, opt)  # wrap for DDP/FSDP/DeepSpeed; per-rank seeds
    ... TrainLoop(run, ...).fit(...) ...
    run.finish({"acc1": ...})            # status.json, summary, final artifacts

The run dir is self-describing: `config.json`, `run.json` (stage, MLflow run id, world
size), `status.json` (running with a heartbeat / preempted / stalled / failed / finished),
`checkpoints/`, `tracking/metrics.jsonl`, and what the stage produces (`model/`, tables,
plots). One run at a time holds a run dir (`.lock`, see `disttrain.runtime.liveness`); a
watchdog thread ends a run whose ranks stall or whose launcher died, resumably.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DeepSpeedEngineWrapper, DistributedType, set_seed

from disttrain import config as config_lib
from disttrain import files
from disttrain.config import ConfigError
from disttrain.runtime.accel import build_accelerator, resolve_strategy
from disttrain.runtime.checkpoint import META, Checkpointer, complete_checkpoints
from disttrain.runtime.exits import PREEMPTED_EXIT_CODE
from disttrain.runtime.liveness import (RunLock, StatusFile, StopRequested, Watchdog, launched_by_a_launcher,
                                        read_status)
from disttrain.runtime.tracking import DESCRIPTION_TAG, PARENT_ENV, NullTracker, Tracker, source_tags

if TYPE_CHECKING:
    from disttrain.models.cards import ModelCard

__all__ = ["PREEMPTED_EXIT_CODE", "Run", "read_status", "start_run"]


class Run:
    """`model_card`: the card of a saved model the stage starts from (its params then say what it
    trains, not the config's model.*); `tags`: what the recipe knows better than the config (the
    method, the dataset of an evaluated model)."""

    def __init__(self, cfg: Any, model_card: ModelCard | None = None, tags: dict[str, str] | None = None):
        self.cfg = cfg
        self.stage = cfg.STAGE
        self.model_card = model_card
        self.extra_tags = dict(tags or {})
        self._tables: list[dict[str, str]] = []  # MLflow tables logged (the mlflow.loggedArtifacts tag)
        self._started = time.perf_counter()
        batch = getattr(cfg, "batch", None)  # absent for stages that train nothing
        self.accelerator = build_accelerator(cfg.runtime, batch)
        self.strategy = resolve_strategy(cfg.runtime) if batch is not None else "ddp"
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.grad_accum_steps = batch.grad_accum_steps(self.world_size) if batch is not None else 1
        plugin = self.accelerator.state.deepspeed_plugin
        self.zero_stage = plugin.zero_stage if plugin is not None else 0
        if self.strategy == "fsdp" and self.accelerator.distributed_type != DistributedType.FSDP and self.is_main:
            # Accelerate shards only on GPU-like devices; the run still forwards in lock-step as FSDP would
            print("note: runtime.strategy=fsdp without a GPU: Accelerate does not shard on the CPU, so the networks "
                  "train with plain data parallelism here (a check of the config and the stage, not of FSDP)",
                  file=sys.stderr, flush=True)
        if cfg.runtime.ema_decay and self.params_sharded:
            raise ConfigError(f"runtime.ema_decay > 0 needs whole parameters on every rank, which "
                              f"{self.strategy}{f' ZeRO-{self.zero_stage}' if self.zero_stage else ''} does not "
                              f"keep; use ddp, or deepspeed with runtime.zero_stage 1 or 2")
        self.run_dir = Path(cfg.run_dir).resolve()
        runtime = cfg.runtime
        self.lock = RunLock(self.run_dir, runtime.heartbeat_seconds)
        self._closed = False
        self._prepare_run_dir()
        self._save_config()
        set_seed(runtime.seed)  # identical on every rank until `prepare`: same initial weights
        ckpt = getattr(cfg, "checkpoint", None)  # absent for stages without state worth resuming
        self.checkpoints = Checkpointer(self.accelerator, self.run_dir, ckpt.keep_last, ckpt.every_steps,
                                        ckpt.every_minutes, progress=self.progress) if ckpt is not None else None
        self.resume_from = self._resume_target()
        self.stop = StopRequested()
        self.status = StatusFile(self.run_dir, self.stage, self.is_main, runtime.heartbeat_seconds)
        self.tracker = self._start_tracking()
        self.status.set("running")
        self.watchdog = Watchdog(
            run_dir=self.run_dir, rank=self.rank, world_size=self.world_size, status=self.status, stop=self.stop,
            stall_timeout_s=runtime.stall_timeout_minutes * 60, heartbeat_s=runtime.heartbeat_seconds,
            stop_grace_s=runtime.stop_grace_seconds, watch_launcher=launched_by_a_launcher(),
            latest_checkpoint=lambda: self.checkpoints.latest() if self.checkpoints else None,
            on_end=self._ended_by_watchdog)

    # -- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    # -- set-up -------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        # every rank checks (the run dir is on a shared filesystem): an error raised on one rank
        # only would leave the others waiting at the next collective
        resume = getattr(self.cfg, "checkpoint", None) and self.cfg.checkpoint.resume
        if resume not in (None, "auto", "never") and not (Path(resume) / META).is_file():
            raise ConfigError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {META} in it); use "
                              f"auto, never, or a path like {self.run_dir}/checkpoints/step-00001000")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-probe-{socket.gethostname()}-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"run_dir={str(self.run_dir)!r} is not writable ({err.strerror or err}); "
                              f"pass run_dir=<a writable directory>") from None
        self._lock_run_dir()
        has_state = complete_checkpoints(self.run_dir / "checkpoints") or (self.run_dir / "run.json").exists()
        if has_state and getattr(self.cfg, "checkpoint", None) and self.cfg.checkpoint.resume == "never":
            raise ConfigError(f"run_dir={str(self.run_dir)!r} already holds a run and checkpoint.resume=never "
                              f"would overwrite it; pick a new run_dir, or resume=auto to continue it")
        self.accelerator.wait_for_everyone()

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run dir's lock before anything is written into it; every rank learns the
        outcome, so a refusal stops all of them (no collective left waiting)."""
        outcome: tuple[str, str] = ("", "")
        if self.is_main:
            try:
                outcome = ("ok", self.lock.acquire())
                atexit.register(self.lock.release)
            except ConfigError as err:
                outcome = ("refused", str(err))
        outcome = self.broadcast(outcome)
        if outcome[0] == "refused":
            raise ConfigError(outcome[1])
        if outcome[1]:
            self.print(outcome[1])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable value, sent over the process group)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _save_config(self) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "config.json"
        if path.is_file():
            before = json.loads(path.read_text()).get("config", {})
            changed = {k: (before.get(k), v) for k, v in config_lib.to_dict(self.cfg).items() if before.get(k) != v}
            if changed:
                print(f"note: config differs from the one saved in {path} (kept as config.previous.json): "
                      + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()), flush=True)
                os.replace(path, self.run_dir / "config.previous.json")
        config_lib.save(self.cfg, path)

    def _resume_target(self) -> Path | None:
        """The checkpoint to resume from: rank 0 verifies the candidates' checksums (a damaged newest
        one is skipped, named), every rank gets its choice."""
        if self.checkpoints is None:
            return None
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                path, notes = self.checkpoints.choose(self.cfg.checkpoint.resume)
                for note in notes:
                    print(note, flush=True)
                outcome = ("ok", str(path) if path else None)
            except ValueError as err:
                outcome = ("refused", str(err))
        outcome = self.broadcast(outcome)
        if outcome[0] == "refused":
            raise ConfigError(outcome[1])
        return Path(outcome[1]) if outcome[1] else None

    def _start_tracking(self) -> NullTracker:
        if not self.is_main:
            return NullTracker()
        info_path = self.run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        parent = self.cfg.tracking.parent_run_id or os.environ.get(PARENT_ENV, "")
        resume_id = info.get("mlflow_run_id", "") if self.resume_from else ""
        name = self.cfg.tracking.run_name or f"{self.stage}:{self.run_dir.name}"
        self.tags = self._tags()
        self.description = self._describe()
        tracker = Tracker(self.run_dir / "tracking", self.cfg.tracking.experiment, name, parent_run_id=parent,
                          resume_run_id=resume_id, tags={**self.tags, DESCRIPTION_TAG: self.description},
                          use_mlflow=self.cfg.tracking.enabled, resuming=self.resume_from is not None,
                          system_metrics=self.cfg.tracking.system_metrics)
        config_path = self.run_dir / "config.json"
        params = tracked_params(self.cfg, self.model_card, run_name=name, parent_run_id=parent,
                                resolved={"world_size": self.world_size, "grad_accum_steps": self.grad_accum_steps,
                                          "strategy": self.strategy})
        if self.resume_from is None:  # a resumed stage's run has them (a changed value would be refused)
            tracker.log_params(params)
        tracker.log_artifact(config_path)
        info.update(stage=self.stage, mlflow_run_id=tracker.run_id, parent_run_id=parent,
                    world_size=self.world_size, strategy=self.strategy, host=socket.gethostname(),
                    tracking_uri=getattr(tracker, "uri", ""), started=info.get("started", time.time()))
        files.write_json(info_path, info)
        return tracker

    def _tags(self) -> dict[str, str]:
        """What tells a run apart in the runs table: stage, method, dataset, preset, seed, world size,
        and MLflow's own source / user / commit tags."""
        cfg, card = self.cfg, self.model_card
        method = getattr(cfg, "method", "") or (card.method if card is not None else "") or \
            ("standard" if self.stage == "train_classifier" else "")
        data = getattr(cfg, "data", None)
        dataset = Path(data.root).name if data is not None and getattr(data, "root", "") else ""
        script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        source = (f"{script.parent.name}/{script.name}" if script and script.parent.name == "recipes" else
                  str(script or self.stage))
        tags = {"disttrain.stage": self.stage, "disttrain.run_dir": str(self.run_dir), "disttrain.method": method,
                "disttrain.dataset": dataset, "disttrain.preset": getattr(cfg, "PRESET", ""),
                "disttrain.seed": str(cfg.runtime.seed), "disttrain.world_size": str(self.world_size),
                **source_tags(source), **self.extra_tags}
        return {k: str(v) for k, v in tags.items() if v != ""}

    def _describe(self, result: str = "") -> str:
        """The run's one-paragraph description (the UI's "Description"): what ran on what, and how it ended."""
        tags = self.tags
        what = f"{self.stage}" + (f" ({tags['disttrain.method']})" if "disttrain.method" in tags else "")
        data = f" on {tags['disttrain.dataset']}" if "disttrain.dataset" in tags else ""
        model = ""
        if self.model_card is not None:
            model = (f", with the {self.model_card.arguments.get('name', self.model_card.architecture)} "
                     f"saved by {self.model_card.stage or 'an earlier stage'}")
        preset = f", preset {tags['disttrain.preset']}" if "disttrain.preset" in tags else ""
        return (f"{what}{data}{model}{preset}; seed {self.cfg.runtime.seed}, {self.world_size} process(es) "
                f"({self.strategy}). Run dir: {self.run_dir}." + (f" Result: {result}." if result else ""))

    # -- training plumbing --------------------------------------------------------------------

    def autocast(self) -> Any:
        """The mixed-precision context of forwards: accelerate's, or under DeepSpeed with bf16
        torch's autocast (DeepSpeed runs in fp32 there, see accel.deepspeed_config)."""
        if self.strategy == "deepspeed" and self.cfg.runtime.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device; with runtime.channels_last its weights channels-last too,
        except under DeepSpeed, whose parameter broadcast and ZeRO flat buffers need contiguous
        weights (inputs still go channels-last, and convolutions follow the input's layout)."""
        channels_last = self.cfg.runtime.channels_last and self.strategy != "deepspeed"
        return model.to(self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def prepare(self, *objects: Any) -> Any:
        """Wrap what trains (models, optimizers) for the strategy; frozen networks stay outside
        (`frozen`). Several trained networks are prepared one at a time, each with the optimizer
        that holds its parameters: FSDP2 shards one network per call, and under DeepSpeed each
        network gets its own engine (the same ZeRO config), which steps its own optimizer."""
        modules = [obj for obj in objects if isinstance(obj, torch.nn.Module)]
        if len(modules) < 2:
            out = self.accelerator.prepare(*objects)
        else:
            self._check_several_networks(len(modules))
            prepared = {}  # id(object) -> its prepared self
            for module, optimizer in _pairs(modules, [o for o in objects if isinstance(o, torch.optim.Optimizer)]):
                with _one_engine_per_network_is_intended():
                    prepared[id(module)], prepared[id(optimizer)] = self.accelerator.prepare(module, optimizer)
            rest = [obj for obj in objects if id(obj) not in prepared]
            if rest:
                prepared.update(zip(map(id, rest), _as_tuple(self.accelerator.prepare(*rest))))
            out = tuple(prepared[id(obj)] for obj in objects)
        set_seed(self.cfg.runtime.seed + 1000 * self.rank)  # from here on each rank has its own stream
        return out

    def _check_several_networks(self, trained: int) -> None:
        """Refuse, before any compute, a strategy that cannot train several networks here."""
        if self.strategy == "deepspeed" and self.zero_stage == 3:
            raise ConfigError(
                f"this stage trains {trained} networks, which runtime.strategy=deepspeed supports with ZeRO-1/2 "
                f"(one engine per network, parameters whole on every rank); ZeRO-3 with several engines is not "
                f"supported here: use runtime.zero_stage=1 or 2, or runtime.strategy=ddp or fsdp")

    def backward(self, loss: torch.Tensor, network: torch.nn.Module) -> None:
        """Backward of a loss that trains `network`: accelerate's, except under DeepSpeed, where
        `network` is an engine and its own backward is used (accelerate's `backward` always drives
        the first engine it prepared); an engine steps its optimizer at the accumulation boundary."""
        if self.strategy == "deepspeed":
            DeepSpeedEngineWrapper(network).backward(loss, sync_gradients=self.accelerator.sync_gradients)
        else:
            self.accelerator.backward(loss)

    def frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A network this stage uses but never trains (a feature extractor, a teacher, a fixed
        generator): on this rank's device, in eval mode, without gradients, in the compute precision
        (bf16 / fp16 weights with runtime.precision bf16 / fp16, fp32 otherwise) and never wrapped or
        sharded: every rank holds it whole, under every strategy. The loop never puts it in train mode
        (it only touches its phases' networks); do not pass it to `prepare`."""
        dtype = _COMPUTE_DTYPE.get(self.cfg.runtime.precision, torch.float32)
        return self.place(module).to(dtype).eval().requires_grad_(False)

    def register(self, **states: Any) -> None:
        """Objects with state_dict/load_state_dict that go into every checkpoint, by name, stored as
        JSON + safetensors (never pickled): the loop's counters, the LR schedule, the EMA, ..."""
        for name, obj in states.items():
            if obj is not None and self.checkpoints is not None:
                self.checkpoints.register(name, obj)

    def progress(self, phase: str, step: int | None = None) -> None:
        """Tell the watchdog this rank is alive and what it does (data, step, eval, checkpoint, ...)."""
        watchdog = getattr(self, "watchdog", None)  # none yet while the run is being set up
        if watchdog is not None:
            watchdog.progress(phase, step)

    def update_status(self, **fields: Any) -> None:
        """Fields of status.json while running (the step, data counters), written with the heartbeat."""
        self.status.update(**fields)

    def resume(self) -> dict | None:
        """Load the checkpoint chosen at start (after prepare/register); None for a fresh run."""
        if self.resume_from is None:
            return None
        meta = self.checkpoints.load(self.resume_from)
        self.print(f"resumed from {self.resume_from} (step {meta['step']})")
        return meta

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)

    @property
    def params_sharded(self) -> bool:
        """True when every forward is a collective (FSDP, ZeRO-3): ranks must forward in lock-step."""
        return self.strategy == "fsdp" or self.zero_stage == 3

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run inference with: unwrapped unless its parameters are sharded."""
        return model if self.params_sharded else self.accelerator.unwrap_model(model)

    def eval_batches(self, loader: Any, most_batches: int, fn: Any) -> list[Any]:
        """`fn(batch)` on every local batch, under no_grad and autocast; returns the outputs.

        With sharded parameters a rank that runs out of batches repeats its last one (output
        discarded) until every rank has done `most_batches` forwards.
        """
        outputs, last = [], None
        with torch.no_grad(), self.autocast():
            for batch in loader:
                self.progress("eval")
                outputs.append(fn(batch))
                last = batch
            if self.params_sharded and last is not None:
                for _ in range(most_batches - len(outputs)):
                    fn(last)
        return outputs

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (pickled), on every rank, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def check_replicas(self, *models: torch.nn.Module) -> bool:
        """Data parallelism must leave identical weights on every rank; verify it exactly, for
        every trained network.

        Gathers a float64 (sum, sum of squares) of every rank's parameters; any difference
        means gradients were not synchronised. Writes them to run_dir/replicas.json.
        """
        if self.params_sharded:
            return True  # each rank holds a different shard by design
        flat = torch.cat([p.detach().double().flatten() for model in models
                          for p in self.accelerator.unwrap_model(model).parameters()])
        local = torch.stack([flat.sum(), (flat * flat).sum()]).to(self.device)
        gathered = self.accelerator.gather(local[None]).tolist()
        identical = all(row == gathered[0] for row in gathered)
        if self.is_main:
            files.write_json(self.run_dir / "replicas.json", {"world_size": self.world_size, "identical": identical,
                                                         "checksums": gathered})
        if not identical:
            raise RuntimeError(f"model replicas differ across ranks after training: {gathered} "
                               f"(gradients were not synchronised)")
        return identical

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> bool:
        """Whatever ends the stage leaves status.json and the MLflow run saying so (never 'running')."""
        if self._closed or exc is None:
            return False
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            self._close()
        elif isinstance(exc, KeyboardInterrupt):
            self.status.set("killed", error="interrupted (Ctrl-C)")
            self.tracker.finish("KILLED")
            self._close()
        else:
            self.failed(exc)
        return False

    # -- the end ------------------------------------------------------------------------------

    def _close(self) -> None:
        """Stop the watchdog and give up the run dir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.watchdog.close()
        if self.is_main:
            self.lock.release()

    def _ended_by_watchdog(self, state: str) -> None:
        """The watchdog ends this process (a stall, or a stop that reached no step boundary)."""
        self.tracker.set_tags({"disttrain.ended": state})
        self.tracker.finish("KILLED")
        if self.is_main:
            self.lock.release()

    def save_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def log_data(self, name: str, manifest_path: Path) -> None:
        """Record what a stage read: the split's manifest (source, class filter applied, shard
        checksums) as an artifact, and its size and exclusions as params."""
        manifest = json.loads(Path(manifest_path).read_text())
        excluded = [e.get("id") for e in manifest.get("filter", {}).get("excluded", [])]
        self.tracker.log_params({f"data.{name}.num_samples": manifest["num_samples"],
                                 f"data.{name}.num_classes": len(manifest["classes"]),
                                 f"data.{name}.excluded_classes": ",".join(map(str, excluded))[:500] or "none"})
        self.tracker.log_artifact(manifest_path, f"data/{name}")
        self.log_dataset(name, Path(manifest_path).parent, "training", manifest)

    def log_dataset(self, name: str, source: str | Path, context: str, manifest: dict | None = None,
                    num_samples: int | None = None) -> None:
        """A dataset input of the run (MLflow's Datasets): a shard split by its manifest's digest,
        anything else (an image folder, noise:...) by its spec and size."""
        profile = {"num_samples": manifest["num_samples"], "num_classes": len(manifest.get("classes", [])),
                   "num_shards": len(manifest.get("shards", []))} if manifest else {"num_samples": num_samples}
        title = f"{Path(str(source)).parent.name}/{Path(str(source)).name}" if manifest else str(source)
        self.tracker.log_dataset(f"{name}: {title}", dataset_digest(manifest, str(source), num_samples),
                                 str(source), context, profile)

    def log_table(self, rows: list[dict[str, Any]], file_name: str) -> Path:
        """`rows` as an MLflow table (what `mlflow.log_table` writes: JSON, pandas' split layout), which the
        UI shows in the run's artifacts and compares across runs (the experiment's "Evaluation" view);
        written to run_dir/file_name, logged like any artifact (rank 0)."""
        columns = list(dict.fromkeys(key for row in rows for key in row))

        def cell(value: Any) -> Any:
            if isinstance(value, float) and value != value:
                return None  # NaN is not JSON
            return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

        path = files.write_json(self.run_dir / file_name,
                                {"columns": columns, "data": [[cell(row.get(c)) for c in columns] for row in rows]})
        self.tracker.log_artifact(path)
        self._tables.append({"path": file_name, "type": "table"})
        self.tracker.set_tags({"mlflow.loggedArtifacts": json.dumps(self._tables)})
        return path

    def save_model(self, model: torch.nn.Module, card: ModelCard, ema: torch.nn.Module | None = None) -> Path:
        """Full (unsharded) weights into run_dir/model/ for the next stage, with their card (this
        stage's name and whether an EMA is saved filled in); atomic like checkpoints."""
        card = dataclasses.replace(card, stage=self.stage, ema=ema is not None)
        card.check(f"the card of {self.stage}'s model")  # a recipe's mistake, before anything is written
        from safetensors.torch import save_file

        state = self.accelerator.get_state_dict(model)  # a collective under ZeRO-3 / FSDP
        out = self.run_dir / "model"
        if self.is_main:
            tmp = self.run_dir / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / "model.safetensors")
            if ema is not None:
                ema_state = ema.module.state_dict()
                save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors")
            files.write_json(tmp / "model.json", card.to_dict())
            files.fsync_tree(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            files.fsync_dir(self.run_dir)
            self.tracker.log_artifact(out / "model.json", "model")
            weights = ["model.safetensors", "model.json"] + (["ema.safetensors"] if ema is not None else [])
            self.tracker.log_model(out, weights, register_as=self.cfg.tracking.register_as,
                                   params={f"card.{k}": v for k, v in card.arguments.items()},
                                   tags={"disttrain.stage": self.stage, "disttrain.method": card.method or "",
                                         "disttrain.architecture": card.architecture})
        self.accelerator.wait_for_everyone()
        return out

    def print_summary(self, summary: dict[str, Any]) -> None:
        uri = getattr(self.tracker, "uri", "") or os.environ.get("MLFLOW_TRACKING_URI", "")
        lines = [f"== {self.stage} finished =="]
        lines += [f"  {key:<26} {value:.4f}" if isinstance(value, float) else f"  {key:<26} {value}"
                  for key, value in summary.items()]
        lines.append(f"  {'run dir':<26} {self.run_dir}")
        if self.tracker.run_id:
            lines.append(f"  {'MLflow run':<26} {self.tracker.run_id} ({uri})")
            ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
            lines.append(f"  {'look at it':<26} {ui}")
        self.print("\n".join(lines))

    def finish(self, summary: dict[str, Any], step: int, headline: str = "") -> None:
        """Close the stage; adds `stage_wall_clock_s` (this process's time in the stage, model
        loading to the end) to `summary` and to the tracked metrics. `headline` ends the run's
        description (default: the final evaluation's metrics in `summary`)."""
        summary["stage_wall_clock_s"] = time.perf_counter() - self._started
        self.log({"stage_wall_clock_s": summary["stage_wall_clock_s"]}, step)
        if self.is_main:
            files.write_json(self.run_dir / "summary.json", summary)
            self.tracker.log_artifact(self.run_dir / "summary.json")
            headline = headline or ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k.startswith("eval/")
                                             and "damaged" not in k and isinstance(v, (int, float)))
            self.tracker.set_tags({DESCRIPTION_TAG: self._describe(headline or f"finished at step {step}")})
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        self.status.set("finished", **{**numbers, "step": step})
        self.tracker.finish("FINISHED")
        self.progress("finish")
        self.accelerator.wait_for_everyone()
        self._close()
        self.accelerator.end_training()

    def preempted(self, step: int, checkpoint: Path) -> None:
        """State is saved; leave with the exit code that tells a scheduler to run us again."""
        self.status.set("preempted", step=step, checkpoint=str(checkpoint), reason=self.stop.describe())
        self.tracker.set_tags({"disttrain.preempted_at_step": str(step)})
        self.tracker.finish("KILLED")
        self.print(f"stopped by {self.stop.describe()} at step {step}; checkpoint {checkpoint}; "
                   f"run the same command again (checkpoint.resume=auto) to continue")
        self.progress("finish")
        self.accelerator.wait_for_everyone()
        self._close()
        sys.exit(PREEMPTED_EXIT_CODE)

    def failed(self, error: BaseException) -> None:
        detail = f"exit code {error.code}" if isinstance(error, SystemExit) else f"{type(error).__name__}: {error}"
        self.status.set("failed", error=detail)
        self.tracker.finish("FAILED")
        self._close()


def start_run(cfg: Any, model_card: ModelCard | None = None, tags: dict[str, str] | None = None) -> Run:
    return Run(cfg, model_card, tags)


# runtime fields of training only: a stage that trains nothing does not log them
_TRAINING_ONLY = ("runtime.grad_clip", "runtime.nonfinite", "runtime.max_skipped_steps", "runtime.ema_decay",
                  "runtime.log_every", "runtime.eval_every", "runtime.zero_stage", "runtime.deepspeed_config",
                  "runtime.channels_last", "resolved.grad_accum_steps")


def tracked_params(cfg: Any, model_card: ModelCard | None, run_name: str, parent_run_id: str,
                   resolved: dict[str, Any]) -> dict[str, Any]:
    """The run's params: what the stage ran with, not what the config left at a default. The
    resolved config (`resolved.*` added), less the sections of methods not chosen (`method`'s other
    choices), a model it inherits described by that model's card (`model.*`), the run name and parent
    run as used, and without what the stage does not use (`UNTRACKED` prefixes of its config class;
    training-only runtime fields when it trains nothing)."""
    params = {**config_lib.to_dict(cfg), **{f"resolved.{k}": v for k, v in resolved.items()},
              "tracking.run_name": run_name, "tracking.parent_run_id": parent_run_id}
    dropped: list[str] = list(getattr(cfg, "UNTRACKED", ()))
    method = next((f for f in dataclasses.fields(cfg) if f.name == "method"), None)
    if method is not None:
        dropped += [f"{choice}." for choice in typing.get_args(typing.get_type_hints(type(cfg))["method"])
                    if choice != cfg.method]
    if getattr(cfg, "batch", None) is None:
        dropped += list(_TRAINING_ONLY)
    if model_card is not None:
        dropped.append("model.")
    params = {k: v for k, v in params.items() if not any(k == d or (d.endswith(".") and k.startswith(d))
                                                          for d in dropped)}
    if not parent_run_id:
        params.pop("tracking.parent_run_id")
    if model_card is not None:
        params.update({f"model.{k}": v for k, v in model_card.arguments.items()},
                      **{"model.architecture": model_card.architecture, "model.from_stage": model_card.stage})
    return params


def dataset_digest(manifest: dict | None, source: str, num_samples: int | None = None) -> str:
    """16 hex digits: of a shard split's manifest (classes, shard names, sizes and checksums), else of
    the source's spec and size."""
    import hashlib

    if manifest:
        shards = [[s.get("name"), s.get("num_samples"), s.get("sha256") or s.get("size")]
                  for s in manifest.get("shards", [])]
        text = json.dumps({"classes": manifest.get("classes"), "shards": shards}, sort_keys=True)
    else:
        text = f"{source}:{num_samples}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _as_tuple(prepared: Any) -> tuple:
    return prepared if isinstance(prepared, tuple) else (prepared,)


def _pairs(modules: list[torch.nn.Module],
           optimizers: list[torch.optim.Optimizer]) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """Each trained network with the one optimizer whose parameters are all its own."""
    pairs, left = [], list(optimizers)
    for index, module in enumerate(modules):
        own = {id(p) for p in module.parameters()}
        mine = [o for o in left if all(id(p) in own for group in o.param_groups for p in group["params"])]
        if len(mine) != 1:
            raise ValueError(f"network {index} ({type(module).__name__}) passed to Run.prepare has {len(mine)} "
                             f"optimizers over its parameters; each trained network needs exactly one (a network "
                             f"that is not trained goes to Run.frozen instead)")
        pairs.append((module, mine[0]))
        left.remove(mine[0])
    if left:
        raise ValueError(f"{len(left)} optimizer(s) passed to Run.prepare hold parameters of no single network")
    return pairs


class _NotAnotherAccelerator(logging.Filter):
    """Drops accelerate's advice, on preparing a second DeepSpeed engine, to make another Accelerator:
    here each engine runs its own backward (Run.backward)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "wrapped DeepSpeed engine reference" not in record.getMessage()


@contextmanager
def _one_engine_per_network_is_intended() -> Iterator[None]:
    log, quiet = logging.getLogger("accelerate.accelerator"), _NotAnotherAccelerator()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)
