"""The one training loop every recipe uses.

A recipe hands over a step function `step_fn(batch) -> {"loss": tensor, **logs}` and a
`loader_for_epoch(epoch, skip_batches)` that yields micro-batches in a deterministic
order; the loop does the rest: gradient accumulation, clipping, a guard against
non-finite losses and gradients, optimizer and LR schedule steps, the EMA of weights,
periodic evaluation, checkpoints (periodic, on pre-emption signals, at the end -- the final
one before the final evaluation, so a failing evaluation never costs the training), rank-0
progress bar, metrics reduced across ranks once per log interval, and the data counters
(damaged samples) summed over ranks and checked against `data.max_bad_fraction`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

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
    def __init__(self, run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, *,
                 scheduler: Any = None, ema: torch.nn.Module | None = None, eval_fn: EvalFn | None = None,
                 data_counters: CountersFn | None = None, data_names: dict[str, str] | None = None):
        """`data_counters()`: this rank's counts of served and damaged samples per stream, a stream's
        keys prefixed (`outliers_served_samples`); `data_names` names each prefix's data in errors."""
        self.run = run
        self.acc = run.accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ema = ema
        self.step_fn = step_fn
        self.eval_fn = eval_fn
        self.data_counters = data_counters  # e.g. damaged samples skipped by the readers; summed over ranks
        self.data_totals: dict[str, float] = {}  # the last sum over ranks
        self.data_names = data_names or {}
        data_cfg = getattr(run.cfg, "data", None)
        self.max_bad_fraction = getattr(data_cfg, "max_bad_fraction", 1.0)
        self.cfg = run.cfg.runtime
        self.state = LoopState()
        self.stats = Stats(run.device)
        self.perf = Throughput(run.device, run.world_size)
        self.last_eval: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._window_bad = False  # a non-finite loss in the current accumulation window
        self._engine_skipped = 0  # DeepSpeed's count of the steps it skipped, as last seen
        run.register(loop=self.state, scheduler=scheduler, ema=ema)

    # -- one optimizer step -------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _micro_step(self, batch: Any) -> bool:
        """Forward + backward of one micro-batch; True when it closed an optimizer step.

        A non-finite loss (on any rank) is replaced by a zero-gradient backward, and the
        optimizer step of its accumulation window is dropped. Under DeepSpeed, whose engine
        steps inside backward, the window's finite micro-batches still make their update.
        """
        with self.acc.accumulate(self.model):
            with self.run.autocast():
                out = self.step_fn(batch)
            loss = out["loss"]
            # all ranks must agree before backward: a rank that skipped would hang the others
            nonfinite, = any_rank([not bool(torch.isfinite(loss.detach()).all())], self.run.device)
            if nonfinite:
                self._nonfinite("loss", loss)
                # a zero-gradient backward keeps DDP buckets and DeepSpeed's micro-step count aligned
                loss = sum((p * 0.0).sum() for p in self._params())
                self._window_bad = True
            else:
                for key, value in out.items():
                    self.stats.add(f"train/{key}", value)
            self.acc.backward(loss)
            stepped = self.acc.sync_gradients
            if stepped:
                grad_ok = self._clip_and_check()
                if self._window_bad or not grad_ok:
                    if self.run.strategy != "deepspeed":  # DeepSpeed has stepped inside backward already
                        self.optimizer.zero_grad(set_to_none=True)
                    self._skip_step()
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.skipped_in_a_row = 0
                self._window_bad = False
        return stepped

    def _clip_and_check(self) -> bool:
        if self.run.strategy == "deepspeed":
            # the engine clips (gradient_clipping in its config) and steps inside backward; it skips a
            # step with non-finite gradients itself and, in fp32/bf16, says nothing: surface it here
            skipped = getattr(self.model, "skipped_steps", 0)
            fresh, self._engine_skipped = skipped > self._engine_skipped, skipped
            if fresh:
                self._nonfinite("gradient (DeepSpeed skipped its optimizer step)", torch.tensor(float("nan")))
            return not fresh
        # the global grad norm costs a pass over every gradient: pay it when clipping, else only
        # on logging steps (a finite loss with non-finite gradients is rare in fp32)
        logging_step = (self.state.step + 1) % self.cfg.log_every == 0
        if self.cfg.grad_clip <= 0 and not logging_step:
            return True
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(self._params(), max_norm)
        if norm is None:
            return True
        self.stats.add("train/grad_norm", norm)
        finite = bool(torch.isfinite(norm))  # grads are already synced, so every rank agrees
        if not finite:
            self._nonfinite("gradient norm", norm)
        return finite

    def _nonfinite(self, what: str, value: torch.Tensor) -> None:
        where = f"step {self.state.step}, epoch {self.state.epoch}, micro-batch {self.state.batch_in_epoch}"
        if self.cfg.nonfinite == "stop":
            latest = self.run.checkpoints.latest()
            raise NonFiniteLossError(
                f"non-finite {what} ({value.detach().flatten()[:4].tolist()}) at {where}; last good checkpoint: "
                f"{latest or 'none'}. Lower optim.lr, set runtime.grad_clip, or runtime.nonfinite=skip to skip "
                f"such steps")

    def _skip_step(self) -> None:
        self.state.skipped_steps += 1
        self.state.skipped_in_a_row += 1
        self.run.print(f"warning: skipped optimizer step {self.state.step} (non-finite loss or gradient); "
                       f"{self.state.skipped_steps} skipped so far")
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
        self._engine_skipped = getattr(self.model, "skipped_steps", 0)  # restored with the engine's state
        bar = tqdm(total=total, initial=self.state.step, disable=not (self.run.is_main and self.cfg.progress_bar),
                   desc=self.run.stage, dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        while self.state.step < total and self.state.epoch < num_epochs:
            self.run.progress("data", self.state.step)
            loader = iter(loader_for_epoch(self.state.epoch, self.state.batch_in_epoch))
            while self.state.batch_in_epoch < steps_per_epoch * accum and self.state.step < total:
                t0 = time.perf_counter()
                self.run.progress("data")
                batch = next(loader)
                wait = time.perf_counter() - t0
                self.run.progress("step")
                stepped = self._micro_step(batch)
                n = _batch_size(batch)
                self.state.batch_in_epoch += 1
                self.state.samples += n * self.run.world_size
                self.perf.add(n, wait)
                if stepped:
                    self._after_step(bar, total, steps_per_epoch)
            if self.state.batch_in_epoch >= steps_per_epoch * accum:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.cfg.eval_every == 0 and self.state.step < total:  # the last one comes after the save
                    self._evaluate()
        bar.close()
        self._count_data()
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
                "replicas_identical": self.run.check_replicas(self.model)}

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

    def _after_step(self, bar: tqdm, total: int, steps_per_epoch: int) -> None:
        state = self.state
        state.step += 1
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(self.model), step=state.step)
        bar.update(1)
        if state.step % self.cfg.log_every == 0 or state.step == total:
            metrics = {**self.stats.reduce(), **self.perf.reduce(),
                       "train/lr": self.optimizer.param_groups[0]["lr"],
                       "train/epoch": state.step / steps_per_epoch, "train/skipped_steps": state.skipped_steps}
            metrics.update({f"data/{name}": value for name, value in self._count_data().items()})
            if self.data_counters is None:
                self.run.update_status(step=state.step)
            self.run.log(metrics, state.step)
            self.history.append({"step": state.step, **metrics})
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                            img_s=f"{metrics['perf/samples_per_s']:.0f}", refresh=False)
            if not (self.run.is_main and self.cfg.progress_bar):
                self.run.print(f"step {state.step}/{total} loss {metrics.get('train/loss', float('nan')):.4f} "
                               f"{metrics['perf/samples_per_s']:.1f} samples/s")
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
        self.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn()
        self.model.train()
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
