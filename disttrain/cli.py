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
    from disttrain.runtime.tracking import replay

    print(f"replayed {args.run_dir} into MLflow run {replay(args.run_dir)}")


def _pipeline(args: argparse.Namespace) -> None:
    from disttrain.runtime import tracking

    if args.action == "start":
        print(tracking.start_pipeline(args.name, experiment=args.experiment))
    else:
        times = tracking.end_pipeline(args.name, status=args.status)
        stages = {key.split("/", 1)[1]: value for key, value in times.items() if key.startswith("stage_wall_clock_s/")}
        for name, seconds in stages.items():
            print(f"  {name:<40} {seconds:8.1f} s")
        print(f"pipeline {args.name} {args.status}: stages {times['pipeline/stages_s']:.1f} s in all, "
              f"{times['pipeline/elapsed_s']:.1f} s from start to end")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="disttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="generate the built-in demo dataset (deterministic, seconds)")
    p.add_argument("--out", default="demo_data", help="output directory (default: ./demo_data)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_demo_data)

    p = sub.add_parser("mlflow-sync", help="replay a run dir's local metric record into MLflow")
    p.add_argument("run_dir")
    p.set_defaults(fn=_mlflow_sync)

    p = sub.add_parser("pipeline", help="open/close the MLflow parent run of a pipeline")
    p.add_argument("action", choices=["start", "end"])
    p.add_argument("name", help="start: the pipeline's name; end: the parent run id")
    p.add_argument("--experiment", default="disttrain")
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
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
