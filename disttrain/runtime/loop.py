"""The one training loop every recipe uses.

A recipe hands over its phases and a `loader_for_epoch(epoch, skip_batches)` that yields
micro-batches in a deterministic order. A phase (`Phase`) is one optimizer's part of an
optimizer step: the networks it trains, its optimizer and LR schedule, a step function
`step_fn(batch) -> {"loss": tensor, **logs}`, how often it runs (`every`: lazy
regularisation every N steps, its loss scaled by N) and its clipping. A classifier is one
phase; a GAN is a generator phase and a discriminator phase (and their lazy regularisers),
run in order on the same micro-batches of each optimizer step, as the StyleGAN loops do.

Per optimizer step the loop takes the step's micro-batches (world x micro x accumulation =
the global batch), then for each due phase: only that phase's networks keep
`requires_grad` (every other trained network is frozen, and not synchronised, for it); each
micro-batch is a forward + backward with gradient synchronisation on the last one only;
then clipping, a guard against non-finite losses and gradients (all ranks agree; stop, or
skip and count), the optimizer and schedule steps. After the phases: the EMA of weights and
the registered hooks (`Hook`: state that follows the steps -- an EMA by half-life, an
augmentation probability, a running mean -- checkpointed with the rest), periodic
evaluation, checkpoints (periodic, on pre-emption signals, at the end -- the final one
before the final evaluation, so a failing evaluation never costs the training), rank-0
progress bar, metrics reduced across ranks once per log interval (with what a loss or a
hook reports through `report(name, value)`), and the data counters (damaged samples)
summed over ranks and checked against `data.max_bad_fraction`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from disttrain.config import ConfigError
from disttrain.data.stream import check_damage
from disttrain.runtime.report import write_history
from disttrain.runtime.run import Run
from disttrain.runtime.stats import Stats, Throughput, any_rank, sum_over_ranks

StepFn = Callable[[Any], dict[str, Any]]
EvalFn = Callable[[], dict[str, float]]
CountersFn = Callable[[], dict[str, int]]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Phase:
    """One optimizer's part of every (or every `every`-th) optimizer step.

    `networks`: the prepared networks this phase trains (the parameters of theirs that were
    trainable when the loop was made get gradients here; every other network of the loop is
    frozen for the phase). `grad_clip`: None takes `runtime.grad_clip`.

    A step function that runs a network its phase does not train (G's phase through D) calls
    `run.accelerator.unwrap_model(net)`: the same network under DDP and FSDP, the bare module of
    its engine under DeepSpeed, whose engines take part in the backward of any loss they feed.
    Under DeepSpeed a phase trains one network (its engine runs the backward and the step).
    `double_backward`: the step function differentiates through a gradient (R1, path length:
    `torch.autograd.grad(..., create_graph=True)`), which sharded parameters (FSDP, ZeRO-3) do not
    survive; such a phase is refused there before any compute."""

    name: str
    networks: Sequence[torch.nn.Module] | torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: StepFn
    scheduler: Any = None
    every: int = 1  # run on steps 0, N, 2N, ...; the loss is multiplied by N (lazy regularisation)
    grad_clip: float | None = None
    double_backward: bool = False

    def __post_init__(self) -> None:
        self.networks = [self.networks] if isinstance(self.networks, torch.nn.Module) else list(self.networks)
        if not self.networks:
            raise ValueError(f"phase {self.name!r} trains no network")
        if self.every < 1:
            raise ValueError(f"phase {self.name!r}: every={self.every} must be >= 1")


class Hook(Protocol):
    """State that follows the optimizer steps (an EMA, an augmentation probability, ...):
    `after_step(loop)` runs after every optimizer step; its state is checkpointed (JSON +
    safetensors, see disttrain.runtime.statefile)."""

    def after_step(self, loop: TrainLoop) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_TRAINING: list[TrainLoop] = []  # the loop training in this process, which report() feeds


def report(name: str, value: Any) -> None:
    """A scalar from anywhere inside a training step (a loss term, a hook), averaged over the log
    interval and the ranks and logged as `name`, like the step function's outputs. Every rank
    must report the same names. Outside a training loop it is dropped."""
    if _TRAINING:
        _TRAINING[-1].stats.add(name, value)


@dataclass
class LoopState:
    """Counters and data position; checkpointed with the rest of the state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed on each rank
    samples: int = 0  # samples consumed over all ranks
    skipped_steps: int = 0
    skipped_in_a_row: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(
        batch, dict) else batch
    return int(first.shape[0])


def total_steps(batches_per_epoch: int, grad_accum_steps: int, num_epochs: int, max_steps: int = 0) -> int:
    """Optimizer steps of a run (what a LR schedule is built for): whole epochs, cut at max_steps."""
    total = (batches_per_epoch // grad_accum_steps) * num_epochs
    if max_steps > 0:
        total = min(total, max_steps) if num_epochs > 0 else max_steps
    return total


class TrainLoop:
    def __init__(self, run: Run, phases: Phase | Sequence[Phase], *, ema: torch.nn.Module | None = None,
                 hooks: dict[str, Hook] | None = None, eval_fn: EvalFn | None = None,
                 data_counters: CountersFn | None = None, data_names: dict[str, str] | None = None):
        """`ema`: a timm ModelEmaV3 of the first phase's first network, updated after every step.
        `hooks`: named stateful objects run after every step, checkpointed. `data_counters()`:
        this rank's counts of served and damaged samples per stream, a stream's keys prefixed
        (`outliers_served_samples`); `data_names` names each prefix's data in errors."""
        self.run = run
        self.acc = run.accelerator
        self.phases = [phases] if isinstance(phases, Phase) else list(phases)
        names = [phase.name for phase in self.phases]
        if not self.phases or len(set(names)) != len(names):
            raise ValueError(f"a loop needs one or more phases with distinct names, got {names}")
        self.networks: list[torch.nn.Module] = []  # every trained network once, in the phases' order
        for phase in self.phases:
            self.networks += [net for net in phase.networks if all(net is not seen for seen in self.networks)]
        self.model = self.networks[0]
        self._trainable = {id(net): [p for p in net.parameters() if p.requires_grad] for net in self.networks}
        self.ema = ema
        self.hooks = dict(hooks or {})
        self.eval_fn = eval_fn
        self.data_counters = data_counters  # e.g. damaged samples skipped by the readers; summed over ranks
        self.data_totals: dict[str, float] = {}  # the last sum over ranks
        self._logged_data: dict[str, float] = {}  # data counters as last logged
        self.data_names = data_names or {}
        data_cfg = getattr(run.cfg, "data", None)
        self.max_bad_fraction = getattr(data_cfg, "max_bad_fraction", 1.0)
        self.cfg = run.cfg.runtime
        self.state = LoopState()
        self.stats = Stats(run.device)
        self.perf = Throughput(run.device, run.world_size)
        self.last_eval: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._engine_skipped: dict[int, int] = {}  # DeepSpeed's count of the steps each engine skipped, as last seen
        self._micro_batch = 0  # the micro-batch of the epoch being stepped (for error messages)
        self._check_strategy(run)
        self._phase: Phase | None = None  # the phase running
        schedulers = {("scheduler" if len(self.phases) == 1 else f"scheduler_{phase.name}"): phase.scheduler
                      for phase in self.phases}
        run.register(loop=self.state, **schedulers, ema=ema, **{f"hook_{name}": h for name, h in self.hooks.items()})

    def _check_strategy(self, run: Run) -> None:
        """Refuse, before any compute, phases the run's strategy cannot train."""
        if run.strategy == "deepspeed":
            counts = {phase.name: len(phase.networks) for phase in self.phases}
            if any(count != 1 for count in counts.values()):
                raise ValueError(f"under DeepSpeed a phase trains one network (one engine each); networks per "
                                 f"phase: {counts}")
        double = [phase.name for phase in self.phases if phase.double_backward]
        if double and run.params_sharded:
            sharding, error = (("runtime.strategy=fsdp", "setStorage: ... out of bounds for storage of size 0")
                               if run.strategy == "fsdp" else ("DeepSpeed ZeRO-3", "mat2 must be a matrix"))
            raise ConfigError(
                f"phase {double[0]!r} differentiates through a gradient (a double backward, e.g. R1), which "
                f"{sharding} cannot run: the second backward needs whole parameters that sharding has already "
                f"released (it fails with {error!r}); use runtime.strategy=ddp, or deepspeed with "
                f"runtime.zero_stage=1 or 2")
        if double and run.strategy == "deepspeed" and run.grad_accum_steps > 1:
            raise ConfigError(
                f"phase {double[0]!r} differentiates through a gradient (e.g. R1), which DeepSpeed gets wrong with "
                f"gradient accumulation: it divides the gradient reaching an engine's output by the "
                f"{run.grad_accum_steps} accumulation steps inside torch.autograd.grad too, shrinking such a penalty "
                f"{run.grad_accum_steps ** 2}-fold; pick batch sizes without accumulation (batch.global_size = "
                f"processes x batch.micro_size) or runtime.strategy=ddp")

    def _metric(self, phase: Phase, key: str) -> str:
        """train/<key> for a one-phase stage, train/<phase>/<key> when there are several."""
        return f"train/{key}" if len(self.phases) == 1 else f"train/{phase.name}/{key}"

    # -- one optimizer step -------------------------------------------------------------------

    def _params(self, phase: Phase) -> list[torch.nn.Parameter]:
        return [p for net in phase.networks for p in net.parameters() if p.requires_grad]

    def _train_only(self, phase: Phase) -> None:
        """Gradients for this phase's networks only (the parameters of theirs that were trainable)."""
        if len(self.networks) == 1:
            return
        for net in self.networks:
            trained = any(net is mine for mine in phase.networks)
            for p in self._trainable[id(net)]:
                p.requires_grad_(trained)

    def _run_phase(self, phase: Phase, window: list[Any]) -> None:
        """Forward + backward of the step's micro-batches for one phase, then its optimizer step.

        Gradients are synchronised on the last micro-batch only. A non-finite loss (on any
        rank) is replaced by a zero-gradient backward, and the phase's optimizer step is
        dropped. Under DeepSpeed, whose engine steps inside backward, the window's finite
        micro-batches still make their update.
        """
        self._train_only(phase)
        self._phase = phase
        others = [net for net in self.networks if all(net is not mine for mine in phase.networks)]
        bad = False
        first = self.state.batch_in_epoch - len(window)  # the window's first micro-batch in the epoch
        for index, batch in enumerate(window):
            self._micro_batch = first + index
            with self.acc.accumulate(*phase.networks), contextlib.ExitStack() as frozen:
                for net in others:  # frozen for this phase: no gradient, so nothing to synchronise
                    frozen.enter_context(self.acc.no_sync(net))
                with self.run.autocast():
                    out = phase.step_fn(batch)
                loss = out["loss"]
                # all ranks must agree before backward: a rank that skipped would hang the others
                nonfinite, = any_rank([not bool(torch.isfinite(loss.detach()).all())], self.run.device)
                if nonfinite:
                    self._nonfinite(f"loss{self._of(phase)}", loss)
                    # a zero-gradient backward keeps DDP buckets and DeepSpeed's micro-step count aligned
                    loss = sum((p * 0.0).sum() for p in self._params(phase))
                    bad = True
                else:
                    for key, value in out.items():
                        self.stats.add(self._metric(phase, key), value)
                self.run.backward(loss * phase.every if phase.every > 1 else loss, phase.networks[0])
                if self.acc.sync_gradients:
                    if bad or not self._clip_and_check(phase):
                        if self.run.strategy != "deepspeed":  # DeepSpeed has stepped inside backward already
                            phase.optimizer.zero_grad(set_to_none=True)
                        self._skip_step(phase)
                    else:
                        phase.optimizer.step()
                        phase.optimizer.zero_grad(set_to_none=True)
                        self.state.skipped_in_a_row = 0
                    if phase.scheduler is not None:
                        phase.scheduler.step()

    def _engine_called(self, engine: torch.nn.Module, _inputs: Any) -> None:
        """Under DeepSpeed an engine joins the backward of every loss its output feeds (and fails when
        it has no gradient of its own there): one its phase does not train must not be called."""
        phase = self._phase
        if phase is not None and torch.is_grad_enabled() and all(engine is not net for net in phase.networks):
            name = type(engine.module).__name__
            raise RuntimeError(f"phase {phase.name!r} called the DeepSpeed engine of {name}, which it does not "
                               f"train; call run.accelerator.unwrap_model(...) of it in that phase's step function")

    def _of(self, phase: Phase) -> str:
        return "" if len(self.phases) == 1 else f" of phase {phase.name}"

    def _clip_and_check(self, phase: Phase) -> bool:
        if self.run.strategy == "deepspeed":
            # the engine clips (gradient_clipping in its config) and steps inside backward; it skips a
            # step with non-finite gradients itself and, in fp32/bf16, says nothing: surface it here
            engine = phase.networks[0]  # the phase's own engine (one per trained network)
            skipped = getattr(engine, "skipped_steps", 0)
            fresh = skipped > self._engine_skipped.get(id(engine), 0)
            self._engine_skipped[id(engine)] = skipped
            if fresh:
                self._nonfinite("gradient (DeepSpeed skipped its optimizer step)", torch.tensor(float("nan")))
            return not fresh
        clip = self.cfg.grad_clip if phase.grad_clip is None else phase.grad_clip
        # the global grad norm costs a pass over every gradient: pay it when clipping, else only
        # on logging steps (a finite loss with non-finite gradients is rare in fp32)
        logging_step = (self.state.step + 1) % self.cfg.log_every == 0
        if clip <= 0 and not logging_step:
            return True
        norm = self.acc.clip_grad_norm_(self._params(phase), clip if clip > 0 else float("inf"))
        if norm is None:
            return True
        self.stats.add(self._metric(phase, "grad_norm"), norm)
        finite = bool(torch.isfinite(norm))  # grads are already synced, so every rank agrees
        if not finite:
            self._nonfinite(f"gradient norm{self._of(phase)}", norm)
        return finite

    def _nonfinite(self, what: str, value: torch.Tensor) -> None:
        where = f"step {self.state.step}, epoch {self.state.epoch}, micro-batch {self._micro_batch}"
        if self.cfg.nonfinite == "stop":
            latest = self.run.checkpoints.latest()
            raise NonFiniteLossError(
                f"non-finite {what} ({value.detach().flatten()[:4].tolist()}) at {where}; last good checkpoint: "
                f"{latest or 'none'}. Lower optim.lr, set runtime.grad_clip, or runtime.nonfinite=skip to skip "
                f"such steps")

    def _skip_step(self, phase: Phase) -> None:
        self.state.skipped_steps += 1
        self.state.skipped_in_a_row += 1
        self.run.print(f"warning: skipped optimizer step {self.state.step}{self._of(phase)} (non-finite loss or "
                       f"gradient); {self.state.skipped_steps} skipped so far")
        if self.state.skipped_in_a_row > self.cfg.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self.state.skipped_in_a_row} optimizer steps in a row were non-finite (limit "
                f"runtime.max_skipped_steps={self.cfg.max_skipped_steps}); the model state is likely broken")

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, loader_for_epoch: Callable[[int, int], Iterable], *, batches_per_epoch: int, num_epochs: int,
            max_steps: int = 0) -> dict[str, Any]:
        """Train until `num_epochs` (or `max_steps` optimizer steps); returns the final metrics.

        `batches_per_epoch` micro-batches are taken from each epoch's loader on every rank
        (the same number everywhere, so collectives line up); it is rounded down to a
        whole number of optimizer steps.
        """
        accum = self.run.grad_accum_steps
        steps_per_epoch = batches_per_epoch // accum
        if steps_per_epoch < 1:
            raise ValueError(f"an epoch has {batches_per_epoch} micro-batches per rank, fewer than the "
                             f"{accum} accumulation steps of one optimizer step; use more data or a smaller "
                             f"batch.global_size")
        total = total_steps(batches_per_epoch, accum, num_epochs, max_steps)
        if max_steps > 0:
            num_epochs = math.ceil(total / steps_per_epoch)
        self._started = time.perf_counter()
        self.run.progress("resume")
        self.run.resume()
        # restored with the engines' state
        self._engine_skipped = {id(net): getattr(net, "skipped_steps", 0) for net in self.networks}
        bar = tqdm(total=total, initial=self.state.step, disable=not (self.run.is_main and self.cfg.progress_bar),
                   desc=self.run.stage, dynamic_ncols=True, mininterval=1.0)
        self._set_train(True)
        _TRAINING.append(self)
        guards = [net.register_forward_pre_hook(self._engine_called) for net in self.networks
                  if self.run.strategy == "deepspeed" and len(self.networks) > 1]
        try:
            self._epochs(loader_for_epoch, accum, steps_per_epoch, total, num_epochs, bar)
        finally:
            _TRAINING.remove(self)
            self._phase = None
            for guard in guards:
                guard.remove()
        bar.close()
        if self._count_data():  # the data counters' final values, once (`data/total/*`): the summary in the run
            self.run.log({f"data/total/{name}": value for name, value in self.data_totals.items()}, self.state.step)
        # the final state is on disk before the final evaluation: if that fails (a damaged test
        # image, a crash), resuming skips straight to it instead of training again
        final = self._save(final=True)
        if not self.last_eval or self.last_eval.get("step") != self.state.step:
            self._evaluate()
            self.run.checkpoints.update_meta(final, {"last_eval": self.last_eval})
        if self.run.is_main:
            for path in write_history(self.history, self.run.run_dir / "report"):
                self.run.save_artifact(path, "report")
        return {**self.last_eval, "step": self.state.step, "skipped_steps": self.state.skipped_steps,
                "replicas_identical": self.run.check_replicas(*self.networks)}

    def _epochs(self, loader_for_epoch: Callable[[int, int], Iterable], accum: int, steps_per_epoch: int,
                total: int, num_epochs: int, bar: tqdm) -> None:
        """Whole optimizer steps until `total` or `num_epochs`: each takes `accum` micro-batches
        and runs every due phase on them."""
        state = self.state
        while state.step < total and state.epoch < num_epochs:
            self.run.progress("data", state.step)
            loader = iter(loader_for_epoch(state.epoch, state.batch_in_epoch))
            while state.batch_in_epoch < steps_per_epoch * accum and state.step < total:
                window = []
                for _ in range(accum):
                    t0 = time.perf_counter()
                    self.run.progress("data")
                    batch = next(loader)
                    n = _batch_size(batch)
                    self.perf.add(n, time.perf_counter() - t0)
                    state.batch_in_epoch += 1
                    state.samples += n * self.run.world_size
                    window.append(batch)
                self.run.progress("step")
                for phase in self.phases:
                    if state.step % phase.every == 0:
                        self._run_phase(phase, window)
                self._after_step(bar, total, steps_per_epoch)
            if state.batch_in_epoch >= steps_per_epoch * accum:
                state.epoch += 1
                state.batch_in_epoch = 0
                if self.cfg.eval_every == 0 and state.step < total:  # the last one comes after the save
                    self._evaluate()

    def _set_train(self, mode: bool) -> None:
        for net in self.networks:
            net.train(mode)

    def summary(self, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """What a training stage reports at the end: the last evaluation, steps, throughput."""
        throughput = [h["perf/samples_per_s"] for h in self.history]
        evals = {k: v for k, v in result.items() if k.startswith("eval/")}
        data = {f"data/{name}": int(value) for name, value in self.data_totals.items()}
        return {**evals, "step": result["step"],
                "images_per_s": sum(throughput) / len(throughput) if throughput else float("nan"),
                "world_size": self.run.world_size, "wall_clock_s": time.perf_counter() - self._started,
                "skipped_steps": result["skipped_steps"], "replicas_identical": result["replicas_identical"],
                **data, **extra}

    def _count_data(self) -> dict[str, float]:
        """The data counters summed over ranks (a collective: every rank calls it at the same step);
        stops the run past data.max_bad_fraction of damaged samples in any stream."""
        if self.data_counters is None:
            return {}
        self.data_totals = sum_over_ranks(self.data_counters(), self.run.device)
        self.run.update_status(step=self.state.step, data={k: int(v) for k, v in self.data_totals.items()})
        for prefix in sorted({name[: -len("served_samples")] for name in self.data_totals
                              if name.endswith("served_samples")}):
            stream = {name[len(prefix):]: value for name, value in self.data_totals.items() if name.startswith(prefix)}
            check_damage(stream, self.max_bad_fraction,
                         self.data_names.get(prefix) or prefix.rstrip("_") or "the training data")
        return self.data_totals

    def _changed_data(self, totals: dict[str, float]) -> dict[str, float]:
        """The damaged-sample counters that changed since they were last logged (from 0): a chart
        appears only where a stream skipped something, not as a zero line at every step. Samples
        served grow every step and are logged once, at the end (`data/total/*`)."""
        changed = {f"data/{name}": value for name, value in totals.items()
                   if not name.endswith("served_samples") and value != self._logged_data.get(name, 0)}
        self._logged_data.update({name[len("data/"):]: value for name, value in changed.items()})
        return changed

    def _after_step(self, bar: tqdm, total: int, steps_per_epoch: int) -> None:
        state = self.state
        state.step += 1
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(self.model), step=state.step)
        for hook in self.hooks.values():
            hook.after_step(self)
        bar.update(1)
        if state.step % self.cfg.log_every == 0 or state.step == total:
            metrics = {**self.stats.reduce(), **self.perf.reduce(),
                       **{self._metric(phase, "lr"): phase.optimizer.param_groups[0]["lr"] for phase in self.phases},
                       "train/epoch": state.step / steps_per_epoch, "train/skipped_steps": state.skipped_steps}
            metrics.update(self._changed_data(self._count_data()))
            if self.data_counters is None:
                self.run.update_status(step=state.step)
            self.run.log(metrics, state.step)
            self.history.append({"step": state.step, **metrics})
            losses = " ".join(f"{key[len('train/'):]} {metrics[key]:.4f}"
                              for key in (self._metric(phase, "loss") for phase in self.phases) if key in metrics)
            bar.set_postfix_str(f"{losses} img_s {metrics['perf/samples_per_s']:.0f}", refresh=False)
            if not (self.run.is_main and self.cfg.progress_bar):
                self.run.print(f"step {state.step}/{total} {losses} {metrics['perf/samples_per_s']:.1f} samples/s")
        if self.cfg.eval_every and state.step % self.cfg.eval_every == 0:
            self._evaluate()
        stop, time_due = any_rank([bool(self.run.stop), self.run.checkpoints.time_due()], self.run.device)
        if stop:
            self.run.preempted(state.step, self._save())
        if time_due or self.run.checkpoints.step_due(state.step):
            self._save()

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        self.run.progress("eval", self.state.step)
        self._set_train(False)
        with torch.no_grad():
            metrics = self.eval_fn()
        self._set_train(True)
        self.last_eval = {**metrics, "step": self.state.step}
        if not metrics:
            return
        self.run.log(metrics, self.state.step)
        self.run.print(f"eval at step {self.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _save(self, final: bool = False):
        self.run.progress("checkpoint wait", self.state.step)
        meta = {"epoch": self.state.epoch, "final": final, "last_eval": self.last_eval}
        path = self.run.checkpoints.save(self.state.step, meta)
        self.run.progress("step", self.state.step)
        return path
