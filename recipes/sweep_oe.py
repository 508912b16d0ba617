"""Stage: choose outlier-exposure hyper-parameters on synthetic validation outliers (mixupoe.txt D.3).

Every point of a grid is a trial: a finetune_oe run with those values, then an evaluate run
of the method's own score on the validation outliers -- Gaussian, Rademacher, blobs, and
corruptions of ID training images (arithmetic / geometric means of pairs, speckle, inverted
colours, pixelation), which reveal nothing of the test-time OOD sets. The chosen trial has
the best mean validation metric among those whose ID accuracy is within `max_acc_drop` of
the Standard model's ("the ID classification accuracy is minimally affected").

This driver runs on one process and starts each trial's stages with `launcher` (`disttrain
launch ...`, which passes the stage's exit code on); trials nest under the sweep's MLflow run.
A finished trial is not run again, so re-running continues. A trial stage that stops with its
state saved (exit code 75 or status pre-empted / stalled: a node drained, a stalled rank) while
the sweep itself was not asked to stop is started again and resumes; a stop of the sweep
(SIGTERM / SIGUSR1) is passed to the running stage, which checkpoints, and the sweep exits 75.

    python recipes/sweep_oe.py --preset bird finetune=[standard=runs/train_classifier/bird,data.root=...,\\
        outliers.root=...] id=/data/shards/cub/test launcher="accelerate launch --multi_gpu --num_processes 8"

Output (run_dir): trial-NN/{finetune,evaluate}/ (the trials' run dirs and logs), trials.csv,
chosen.json (read by `finetune_oe hparams_from=<this run dir>`), summary.json -- and the MLflow run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from disttrain import config, files
from disttrain.config import ConfigError, FinetuneOEConfig, SweepOEConfig
from disttrain.data.sources import open_source
from disttrain.methods.outlier_exposure import OBJECTIVES
from disttrain.runtime import PREEMPTED_EXIT_CODE, USAGE_ERROR_EXIT_CODE, entrypoint, read_status, start_run
from disttrain.runtime.tracking import PARENT_ENV

RECIPES = Path(__file__).resolve().parent
LOWER_IS_BETTER = {"fpr95"}


MAX_RESTARTS = 3  # a trial stage that stops with its state saved is started again this often


class TrialStopped(Exception):
    """The sweep was asked to stop while a trial ran: the trial checkpointed; the sweep resumes later."""


class Launcher:
    """Runs trial stages with the sweep's `launcher`, passes a stop of the sweep on to them, and
    restarts a stage that stopped with its state saved while the sweep was not stopping."""

    def __init__(self, launcher: str, parent_run_id: str, stop: Any, tick: Callable[[str], None]):
        self.launcher, self.parent_run_id, self.stop, self.tick = launcher, parent_run_id, stop, tick

    def run(self, recipe: str, args: list[str], run_dir: Path, log: Path) -> None:
        """Run one stage to the end; its output goes to `log`. A failure names the log."""
        for attempt in range(MAX_RESTARTS + 1):
            code = self._once(recipe, [*args, f"run_dir={run_dir}"], log)
            if code == 0:
                return
            saved = code == PREEMPTED_EXIT_CODE or (code != USAGE_ERROR_EXIT_CODE and read_status(run_dir).get(
                "state") in ("preempted", "stalled"))  # a launcher that reports every failure as 1
            if saved and self.stop:
                raise TrialStopped(f"{recipe} stopped with its state saved; see {log}")
            if not saved:
                raise RuntimeError(f"{recipe} exited with {code}; see {log}")
            with open(log, "a") as out:
                out.write(f"# stopped with its state saved (exit code {code}); restarting it to resume "
                          f"({attempt + 1} of {MAX_RESTARTS})\n")
        raise RuntimeError(f"{recipe} stopped {MAX_RESTARTS + 1} times without finishing; see {log}")

    def _once(self, recipe: str, args: list[str], log: Path) -> int:
        command = [*shlex.split(self.launcher), str(RECIPES / recipe), *args]
        # the stage ends (checkpointed) when this driver dies, even by kill -9: DISTTRAIN_LAUNCHED
        env = {**os.environ, "DISTTRAIN_LAUNCHED": "1", **({PARENT_ENV: self.parent_run_id}
                                                          if self.parent_run_id else {})}
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            forwarded = False
            while proc.poll() is None:
                if self.stop and not forwarded:
                    proc.send_signal(signal.SIGTERM)  # the stage checkpoints and exits 75
                    forwarded = True
                self.tick("checkpoint" if forwarded else "trial")  # a stopping stage writes its checkpoint
                time.sleep(0.5)
        return proc.returncode


def run_trial(cfg: SweepOEConfig, index: int, overrides: dict[str, str], score: str, id_set: str, val: list[str],
              launcher: Launcher) -> dict[str, Any]:
    """Fine-tune, then evaluate on the validation outliers; the trial's row of trials.csv."""
    trial = Path(cfg.run_dir).resolve() / f"trial-{index:02d}"
    finetune_dir, evaluate_dir = trial / "finetune", trial / "evaluate"
    trial.mkdir(parents=True, exist_ok=True)
    if read_status(finetune_dir).get("state") != "finished":
        preset = ["--preset", cfg.finetune_preset] if cfg.finetune_preset else []
        launcher.run("finetune_oe.py", [*preset, *cfg.finetune, *(f"{k}={v}" for k, v in overrides.items()),
                                        "runtime.progress_bar=false"], finetune_dir, trial / "finetune.log")
    if read_status(evaluate_dir).get("state") != "finished":
        launcher.run("evaluate.py", [f"model={finetune_dir}", f"id={id_set}", f"ood=[{','.join(val)}]",
                                     f"scorers=[{score}]", "plots=false", *cfg.evaluate], evaluate_dir,
                     trial / "evaluate.log")
    rows = [r for r in json.loads((evaluate_dir / "results.json").read_text()) if r["scorer"] == score]
    values = {r["ood"]: r[cfg.metric] for r in rows}
    return {"trial": index, **overrides, f"val_{cfg.metric}": sum(values.values()) / len(values),
            "id_accuracy": rows[0]["id_accuracy"], **{f"{cfg.metric}/{k}": v for k, v in values.items()}}


def choose(trials: list[dict[str, Any]], metric: str, reference_acc: float, max_drop: float) -> tuple[dict, bool]:
    """The best trial by the validation metric among those within `max_drop` of the reference
    accuracy; (the most accurate trial, False) when none is."""
    key = f"val_{metric}"
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    qualified = [t for t in trials if t["id_accuracy"] >= reference_acc - max_drop]
    if not qualified:
        return max(trials, key=lambda t: t["id_accuracy"]), False
    return max(qualified, key=lambda t: sign * t[key]), True


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(SweepOEConfig, argv)
    # -- inputs checked before the first trial ------------------------------------------------
    trials = cfg.trial_overrides()
    shared = dict(item.split("=", 1) for item in cfg.finetune)
    base = config.build(FinetuneOEConfig, cfg.finetune_preset or None, {"run_dir": "-", **shared})
    for trial in trials:  # every trial's finetune_oe config builds: its mistake named now, not after trial 3
        config.build(FinetuneOEConfig, cfg.finetune_preset or None, {"run_dir": "-", **shared, **trial})
    score = OBJECTIVES[base.method].score
    id_set = cfg.id or str(Path(base.data.root) / base.data.eval_split)
    val = cfg.validation_sets(str(Path(base.data.root) / base.data.train_split))
    for spec in (id_set, *val):
        open_source(spec, base.data.image_size)
    reference = json.loads((Path(base.standard) / "summary.json").read_text()).get("eval/acc1") \
        if base.standard and (Path(base.standard) / "summary.json").is_file() else None
    if base.standard and reference is None:
        raise ConfigError(f"the Standard run {base.standard} has no summary.json with eval/acc1: point the trials "
                          f"(finetune=[standard=...]) at a finished train_classifier run")

    with start_run(cfg) as run:
        run.print(f"sweep: {len(trials)} trials of {base.method}, scored by {score} on {len(val)} validation "
                  f"sets ({cfg.metric}); reference ID accuracy {reference if reference is not None else 'best trial'}")
        launcher = Launcher(cfg.launcher, run.tracker.run_id or "", run.stop, run.progress)
        results = []
        for index, overrides in enumerate(trials):
            try:
                if run.stop:  # a pre-emption signal between trials
                    raise TrialStopped(f"{run.stop.describe()} before trial {index}")
                row = run_trial(cfg, index, overrides, score, id_set, val, launcher)
            except TrialStopped as stopped:
                run.print(f"sweep stopped: {stopped}; finished trials are kept, run the same command to go on")
                run.preempted(index, run.run_dir)
            results.append(row)
            run.log({f"trial/val_{cfg.metric}": row[f"val_{cfg.metric}"], "trial/id_accuracy": row["id_accuracy"]},
                    index)
            run.print(f"trial {index}: {overrides} -> val {cfg.metric} {row[f'val_{cfg.metric}']:.4f}, "
                      f"ID accuracy {row['id_accuracy']:.4f}")
        ref = reference if reference is not None else max(r["id_accuracy"] for r in results)
        best, qualified = choose(results, cfg.metric, ref, cfg.max_acc_drop)
        chosen = {"overrides": trials[best["trial"]], "trial": best["trial"], "metric": cfg.metric,
                  f"val_{cfg.metric}": best[f"val_{cfg.metric}"], "id_accuracy": best["id_accuracy"],
                  "reference_accuracy": ref, "within_accuracy_budget": qualified}
        if run.is_main:
            for path in (files.write_csv(run.run_dir / "trials.csv", results),
                         files.write_json(run.run_dir / "chosen.json", chosen)):
                run.save_artifact(path)
            run.tracker.log_params({f"chosen.{k}": v for k, v in chosen["overrides"].items()})
        if not qualified:
            run.print(f"warning: no trial kept ID accuracy within {cfg.max_acc_drop} of {ref:.4f}; chose the most "
                      f"accurate one")
        summary = {"trials": len(results), "chosen_trial": best["trial"], **{f"chosen.{k}": v for k, v in
                                                                            chosen["overrides"].items()},
                   f"val_{cfg.metric}": best[f"val_{cfg.metric}"], "id_accuracy": best["id_accuracy"],
                   "chosen_file": str(run.run_dir / "chosen.json")}
        run.finish(summary, step=len(results))
        run.print_summary(summary)


if __name__ == "__main__":
    entrypoint(main)
