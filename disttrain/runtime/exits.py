"""How a stage ends, as an exit code its caller can act on.

    0   finished
    1   failed (a bug, a crash: look at the traceback)
    2   bad input: a config or data error, reported before any compute (fix it, run again)
    75  stopped, state saved (pre-empted, launcher gone, a stalled rank): run the same command again

`accelerate launch` reports any worker's non-zero exit as 1, so a worker also writes its
code into the folder named by DISTTRAIN_EXIT_DIR when `disttrain launch` (which sets it)
started it; `disttrain launch` passes the code on (see `disttrain.runtime.launch`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

USAGE_ERROR_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: state saved, run the same command again to continue
EXIT_DIR_ENV = "DISTTRAIN_EXIT_DIR"


def record_exit(code: int, message: str = "") -> None:
    """Leave this process's exit code (and the one-line reason) for `disttrain launch`."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        path = Path(folder) / f"rank-{rank}.json"
        path.write_text(json.dumps({"rank": int(rank), "code": int(code), "message": message}))
    except (OSError, ValueError):
        pass  # the exit code itself still tells what happened


def read_exits(folder: str | os.PathLike) -> list[dict]:
    """The exit records the workers left, in rank order."""
    out = []
    for path in Path(folder).glob("rank-*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("rank", 0))
