"""`disttrain launch`: `accelerate launch`, with the stage's exit code passed on.

    disttrain launch [accelerate launch options] recipes/<stage>.py [--preset NAME] [key=value ...]

It takes the options of `accelerate launch` and starts it. The differences, for callers that
act on the outcome (Slurm scripts, sweep_oe's trials, a user's shell):

- the stage's config is checked first, in this process: a bad config is one line and exit
  code 2, and no worker is started (`accelerate launch` prints the workers' elastic
  traceback after the error);
- the exit code is the stage's (disttrain.runtime.exits): 0 finished, 2 bad input, 75 stopped
  with its state saved (run the same command again), 1 failed. `accelerate launch` turns
  every worker failure into 1; here each worker leaves its code in a folder named by
  DISTTRAIN_EXIT_DIR and this process reads them;
- SIGTERM / SIGUSR1 / SIGHUP sent to this process reach the launcher as SIGTERM (which stops
  the workers; they checkpoint). Under Slurm, where `scancel --signal` reaches every process
  of the step, they are not sent twice. If this process dies, even by kill -9, the launcher
  gets SIGTERM too (Linux' parent-death signal), so no worker trains on as an orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from disttrain.runtime.exits import EXIT_DIR_ENV, PREEMPTED_EXIT_CODE, USAGE_ERROR_EXIT_CODE, read_exits

USAGE = "usage: disttrain launch [accelerate launch options] recipes/<stage>.py [--preset NAME] [key=value ...]"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the launcher's process, before exec: SIGTERM when this wrapper dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: a killed wrapper then leaves the launcher running
        pass


def preflight(script: str, args: list[str]) -> int | None:
    """Check the stage's config here; an exit code to stop with (2, or 0 after --help), or None."""
    from disttrain import config

    cls = config.stage_configs().get(Path(script).stem)
    if cls is None:
        return None  # not a stage with a config of ours (a benchmark, a user's script)
    try:
        config.parse_cli(cls, args)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USAGE_ERROR_EXIT_CODE
    except SystemExit as done:  # --help / --print-config printed what was asked
        return done.code if isinstance(done.code, int) else 0
    return None


def outcome(returncode: int, exits: list[dict]) -> int:
    """The exit code to report: bad input over a saved stop over the launcher's own code."""
    codes = [record.get("code") for record in exits]
    if USAGE_ERROR_EXIT_CODE in codes:
        return USAGE_ERROR_EXIT_CODE
    if PREEMPTED_EXIT_CODE in codes:
        return PREEMPTED_EXIT_CODE
    if returncode < 0:  # the launcher died of a signal
        return 128 - returncode
    return returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.split(chr(10) + chr(10), 2)[2]}")
        return 0
    scripts = [i for i, arg in enumerate(argv) if arg.endswith(".py") and Path(arg).is_file()]
    if not scripts:
        print(f"error: no recipe script (recipes/<stage>.py) among the arguments\n{USAGE}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    where = scripts[0]
    options, script, args = argv[:where], argv[where], argv[where + 1:]
    stop = preflight(script, args)
    if stop is not None:
        return stop
    with tempfile.TemporaryDirectory(prefix="disttrain-exit-") as exit_dir:
        env = {**os.environ, EXIT_DIR_ENV: exit_dir, "DISTTRAIN_LAUNCHED": "1"}
        command = [sys.executable, "-m", "accelerate.commands.launch", *options, script, *args]
        launcher = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)

        def forward(signum: int, _frame: object) -> None:
            if not os.environ.get("SLURM_STEP_ID") and launcher.poll() is None:
                launcher.send_signal(signal.SIGTERM)

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher and workers directly
        returncode = launcher.wait()
        exits = read_exits(exit_dir)
    code = outcome(returncode, exits)
    first = next((r for r in exits if r.get("code") == code and r.get("message")), None)
    if code == USAGE_ERROR_EXIT_CODE and first and first.get("rank", 0) != 0:
        print(f"error (rank {first['rank']}): {first['message']}", file=sys.stderr)  # rank 0 printed only its own
    if code == PREEMPTED_EXIT_CODE:
        print("disttrain launch: the stage stopped with its state saved (exit code 75); run the same command "
              "again to continue", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
