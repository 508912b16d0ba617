"""The only layer that knows about Accelerate, DeepSpeed, MLflow, signals and checkpoints."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from disttrain.config import ConfigError
from disttrain.data.shards import DataError
from disttrain.runtime.exits import PREEMPTED_EXIT_CODE, USAGE_ERROR_EXIT_CODE, record_exit
from disttrain.runtime.loop import Hook, NonFiniteLossError, Phase, TrainLoop, report
from disttrain.runtime.run import Run, read_status, start_run

__all__ = ["PREEMPTED_EXIT_CODE", "USAGE_ERROR_EXIT_CODE", "Hook", "NonFiniteLossError", "Phase", "Run", "TrainLoop",
           "entrypoint", "read_status", "report", "start_run"]


def entrypoint(main: Callable[[list[str]], None]) -> None:
    """Run a recipe's main(argv) and exit with a code its caller can act on (disttrain.runtime.exits):
    a bad config or dataset is one clear line (rank 0) and exit code 2; a saved stop is 75."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        record_exit(USAGE_ERROR_EXIT_CODE, str(err))
        sys.exit(USAGE_ERROR_EXIT_CODE)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        record_exit(code)
        raise
    except Exception as err:  # noqa: BLE001 -- reported and ended below, never swallowed
        record_exit(1, f"{type(err).__name__}: {err}")
        # ended as a SystemExit: an exception left raised keeps its frames, and the DataLoader iterators
        # they hold, alive into interpreter shutdown, which then waits forever for data workers that
        # ignore SIGTERM (disttrain.data.shards.ignore_stop_signals)
        traceback.print_exc()
        sys.exit(1)
    except BaseException as err:
        record_exit(1, f"{type(err).__name__}: {err}")
        raise
    record_exit(0)
