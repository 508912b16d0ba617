"""`disttrain`: utilities that are not training stages (those are `recipes/*.py`)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo_data(args: argparse.Namespace) -> None:
    from disttrain.data import demo

    start = time.perf_counter()
    info = demo.generate(args.out, seed=args.seed)
    counts = ", ".join(f"{name} {split['num_samples']}" for name, split in info["splits"].items())
    print(f"demo data in {args.out} ({time.perf_counter() - start:.1f}s): {counts}; "
          f"{len(info['id_classes'])} ID classes, {len(info['holdout_classes'])} held-out classes")


def _mlflow_sync(args: argparse.Namespace) -> None:
    from disttrain.runtime.tracking import SyncError, sync

    try:
        print(sync(args.run_dir))
    except SyncError as err:  # MLflow failed midway: not the user's input (exit 2), worth running again
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def _status(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from disttrain.config import ConfigError
    from disttrain.runtime.liveness import format_report, run_report

    if not (Path(args.run_dir) / "status.json").is_file():
        raise ConfigError(f"{args.run_dir} holds no status.json: is it the run_dir of a stage?")
    report = run_report(args.run_dir)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))


def _pipeline(args: argparse.Namespace) -> None:
    from disttrain.runtime import tracking

    if args.action == "start":
        known = {"preset": args.preset, "methods": args.methods, "seeds": args.seeds, "stages": args.stages}
        print(tracking.start_pipeline(args.name, experiment=args.experiment, params=known))
    else:
        times = tracking.end_pipeline(args.name, status=args.status)
        stages = {key.split("/", 1)[1]: value for key, value in times.items() if key.startswith("stage_wall_clock_s/")}
        for name, seconds in stages.items():
            print(f"  {name:<40} {seconds:8.1f} s")
        print(f"pipeline {args.name} {args.status}: stages {times['pipeline/stages_s']:.1f} s in all, "
              f"{times['pipeline/elapsed_s']:.1f} s from start to end")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "launch":  # its options are accelerate launch's: no parsing here
        from disttrain.runtime import launch

        raise SystemExit(launch.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="disttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("launch", help="accelerate launch a recipe, passing its exit code on (2 bad input, 75 stopped "
                                  "with state saved); `disttrain launch --help`")

    p = sub.add_parser("status", help="a run dir's state; for a 'running' one, whether it is alive")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(fn=_status)

    p = sub.add_parser("demo-data", help="generate the built-in demo dataset (deterministic, seconds)")
    p.add_argument("--out", default="demo_data", help="output directory (default: ./demo_data)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_demo_data)

    p = sub.add_parser("mlflow-sync", help="send what a run dir's local record holds and MLflow lacks into its run "
                       "(after an outage; running it again sends nothing)")
    p.add_argument("run_dir")
    p.set_defaults(fn=_mlflow_sync)

    p = sub.add_parser("pipeline", help="open/close the MLflow parent run of a pipeline")
    p.add_argument("action", choices=["start", "end"])
    p.add_argument("name", help="start: the pipeline's name; end: the parent run id")
    p.add_argument("--experiment", default="disttrain")
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    for option, what in (("preset", "the stages' preset"), ("methods", "the methods compared, comma-separated"),
                         ("seeds", "the training seeds, comma-separated"), ("stages", "the stages, comma-separated")):
        p.add_argument(f"--{option}", default="", help=f"start: {what}, a param of the parent run (`pipeline end` "
                       f"fills in, from the stage runs, what is not given)")
    p.set_defaults(fn=_pipeline)

    from disttrain import data_cli
    from disttrain.config import ConfigError
    from disttrain.data.shards import DataError

    data_cli.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
