"""Stage: choose outlier-exposure hyper-parameters on synthetic validation outliers (mixupoe.txt D.3).

Every point of a grid is a trial: a finetune_oe run with those values, then an evaluate run
of the method's own score on the validation outliers -- Gaussian, Rademacher, blobs, and
corruptions of ID training images (arithmetic / geometric means of pairs, speckle, inverted
colours, pixelation), which reveal nothing of the test-time OOD sets. The chosen trial has
the best mean validation metric among those whose ID accuracy is within `max_acc_drop` of
the Standard model's ("the ID classification accuracy is minimally affected").

This driver runs on one process and starts each trial's stages with `launcher`; trials nest
under the sweep's MLflow run. A finished trial is not run again, so re-running continues.

    python recipes/sweep_oe.py --preset bird finetune=[standard=runs/train_classifier/bird,data.root=...,\\
        outliers.root=...] id=/data/shards/cub/test launcher="accelerate launch --multi_gpu --num_processes 8"

Output (run_dir): trial-NN/{finetune,evaluate}/ (the trials' run dirs and logs), trials.csv,
chosen.json (read by `finetune_oe hparams_from=<this run dir>`), summary.json -- and the MLflow run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from disttrain import config, files
from disttrain.config import ConfigError, FinetuneOEConfig, SweepOEConfig
from disttrain.data.sources import open_source
from disttrain.methods.outlier_exposure import OBJECTIVES
from disttrain.runtime import PREEMPTED_EXIT_CODE, entrypoint, read_status, start_run
from disttrain.runtime.tracking import PARENT_ENV

RECIPES = Path(__file__).resolve().parent
LOWER_IS_BETTER = {"fpr95"}


class TrialStopped(Exception):
    """A trial's stage was pre-empted (exit code 75): the sweep stops too and resumes later."""


def launch(launcher: str, recipe: str, args: list[str], log: Path, parent_run_id: str) -> None:
    """Run one stage to the end; its output goes to `log`. A failure names the log."""
    command = [*shlex.split(launcher), str(RECIPES / recipe), *args]
    env = {**os.environ, PARENT_ENV: parent_run_id} if parent_run_id else dict(os.environ)
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code == PREEMPTED_EXIT_CODE:
        raise TrialStopped(f"{recipe} was pre-empted; see {log}")
    if code != 0:
        raise RuntimeError(f"{recipe} exited with {code}; see {log}")


def run_trial(cfg: SweepOEConfig, index: int, overrides: dict[str, str], score: str, id_set: str, val: list[str],
              parent: str) -> dict[str, Any]:
    """Fine-tune, then evaluate on the validation outliers; the trial's row of trials.csv."""
    trial = Path(cfg.run_dir).resolve() / f"trial-{index:02d}"
    finetune_dir, evaluate_dir = trial / "finetune", trial / "evaluate"
    trial.mkdir(parents=True, exist_ok=True)
    if read_status(finetune_dir).get("state") != "finished":
        preset = ["--preset", cfg.finetune_preset] if cfg.finetune_preset else []
        launch(cfg.launcher, "finetune_oe.py", [*preset, *cfg.finetune, *(f"{k}={v}" for k, v in overrides.items()),
                                                f"run_dir={finetune_dir}", "runtime.progress_bar=false"],
               trial / "finetune.log", parent)
    if read_status(evaluate_dir).get("state") != "finished":
        launch(cfg.launcher, "evaluate.py", [f"model={finetune_dir}", f"id={id_set}", f"ood=[{','.join(val)}]",
                                             f"scorers=[{score}]", "plots=false", *cfg.evaluate,
                                             f"run_dir={evaluate_dir}"], trial / "evaluate.log", parent)
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
        results = []
        for index, overrides in enumerate(trials):
            try:
                if run.stop:  # a pre-emption signal between trials
                    raise TrialStopped(f"signal {run.stop.signal} before trial {index}")
                row = run_trial(cfg, index, overrides, score, id_set, val, run.tracker.run_id or "")
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
