"""The only layer that knows about Accelerate, DeepSpeed, MLflow, signals and checkpoints."""

from __future__ import annotations

import os
import sys
from typing import Callable

from disttrain.config import ConfigError
from disttrain.data.shards import DataError
from disttrain.runtime.loop import NonFiniteLossError, TrainLoop
from disttrain.runtime.run import PREEMPTED_EXIT_CODE, Run, read_status, start_run

__all__ = ["PREEMPTED_EXIT_CODE", "NonFiniteLossError", "Run", "TrainLoop", "entrypoint", "read_status",
           "start_run"]

USAGE_ERROR_EXIT_CODE = 2


def entrypoint(main: Callable[[list[str]], None]) -> None:
    """Run a recipe's main(argv); a bad config or dataset is one clear line (rank 0), exit code 2."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR_EXIT_CODE)
