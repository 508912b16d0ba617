"""Telling a live run from a dead or stuck one, and ending a stuck one within a bound.

- `RunLock`: one run per run dir. `run_dir/.lock` is created exclusively by rank 0 and
  names the holder (host, PID, since when); a second run is refused before any compute.
  A lock whose holder is dead (its PID gone on this host, or on another host no heartbeat
  for several intervals, or an earlier incarnation of the same Slurm job) is taken over,
  with a message.
- `StatusFile`: `status.json`, written by rank 0, with a heartbeat every
  `runtime.heartbeat_seconds` while the run is running, so the next start and
  `disttrain status <run_dir>` can tell a dead run (kill -9, a lost node) from a live one.
- `Watchdog`: a thread on every rank. The training code reports progress (`phase`: data,
  step, eval, checkpoint, ...); each rank writes its last progress into
  `run_dir/.ranks/rank-N.json` every heartbeat. When a rank makes no progress for
  `runtime.stall_timeout_minutes` (a frozen rank, and every rank waiting for it in a
  collective), the watchdog names the rank that stalled, marks the run `stalled`, and ends
  the process with exit code 75: the scheduler requeues it and `resume=auto` continues
  from the last checkpoint -- instead of waiting for the process group's 30-minute timeout.
  It also ends the process when a stop was asked for (SIGTERM / SIGUSR1, or the launcher
  that started this worker died) but no step boundary -- where the checkpoint is written --
  was reached within `runtime.stop_grace_seconds`. Signals are seen through a wakeup fd,
  because Python runs signal handlers only when the main thread is back from C code (a
  blocked collective never is).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psutil

from disttrain import files
from disttrain.config import ConfigError
from disttrain.runtime.exits import PREEMPTED_EXIT_CODE, record_exit

LOCK_FILE = ".lock"
RANKS_DIR = ".ranks"
STATUS_FILE = "status.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(run_dir: str | os.PathLike) -> dict:
    return _read_json(Path(run_dir) / STATUS_FILE) or {}


def _since(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _this_process() -> dict[str, Any]:
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": me.create_time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}


def process_liveness(holder: dict, status: dict, now: float | None = None) -> tuple[bool, str]:
    """(alive?, why) for the process a lock or status names."""
    now = time.time() if now is None else now
    host, pid = holder.get("host", "?"), holder.get("pid", -1)
    if host == socket.gethostname():
        try:
            proc = psutil.Process(int(pid))
            started_ok = abs(proc.create_time() - float(holder.get("pid_started", proc.create_time()))) < 1.0
            if started_ok and proc.status() != psutil.STATUS_ZOMBIE:
                return True, f"process {pid} is running"
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
            pass
        return False, f"process {pid} on this host is gone"
    beat = status.get("heartbeat") if status.get("pid") == pid and status.get("host") == host else None
    stale_after = float(holder.get("stale_after_s", 120.0))
    if beat is None:
        started = float(holder.get("started", 0.0))
        return (now - started < stale_after,
                f"no heartbeat since it started {now - started:.0f} s ago")
    age = now - float(beat)
    return age < stale_after, f"last heartbeat {age:.0f} s ago (stale after {stale_after:.0f} s)"


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {_since(float(holder.get('started', 0)))}"
            + (f" (Slurm job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""))


# --------------------------------------------------------------------------- the run dir lock


class RunLock:
    """`run_dir/.lock`, created with O_EXCL (atomic on local disks, NFS and Lustre alike)."""

    def __init__(self, run_dir: Path, heartbeat_s: float):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.stale_after_s = max(3.0 * heartbeat_s, 60.0)
        self.held = False

    def acquire(self) -> str:
        """Take the lock; returns a note when a dead run's lock was taken over. A live holder
        is a ConfigError naming it."""
        note = ""
        for _ in range(5):
            if self._create():
                return note
            holder = _read_json(self.path)
            if holder is None:  # being written this instant, or garbage left by a crash
                if time.time() - self._mtime() < 5.0:
                    time.sleep(0.2)
                    continue
                holder = {"host": "?", "pid": "?", "started": self._mtime()}
                alive, why = False, "an unreadable lock file"
            elif os.environ.get("SLURM_JOB_ID") and holder.get("slurm_job_id") == os.environ["SLURM_JOB_ID"]:
                alive, why = False, "an earlier run of this Slurm job, which was requeued"
            else:
                alive, why = process_liveness(holder, read_status(self.run_dir))
            if alive:
                raise ConfigError(
                    f"run_dir={str(self.run_dir)!r} is in use by another run: {describe_holder(holder)}, {why}. "
                    f"Wait for it to end or pick another run_dir (two runs in one directory overwrite each "
                    f"other's checkpoints); if you are sure it is dead, delete {self.path}")
            if self._take_over(holder):
                note = f"note: took over the lock of a dead run in {self.run_dir} ({describe_holder(holder)}: {why})"
        raise ConfigError(f"could not lock run_dir={str(self.run_dir)!r} ({self.path} keeps changing): is another "
                          f"run starting in it?")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {**_this_process(), "started": time.time(), "token": self.token, "stale_after_s": self.stale_after_s}
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(info))
            handle.flush()
            os.fsync(handle.fileno())
        self.held = True
        return True

    def _take_over(self, dead: dict) -> bool:
        """Remove a dead holder's lock -- only if it is still that one (two starts may race here)."""
        with open(self.run_dir / f"{LOCK_FILE}.guard", "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:
                pass  # a filesystem without flock: the O_EXCL create below still admits one winner
            current = _read_json(self.path)
            if current is not None and current.get("token") != dead.get("token"):
                return False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_json(self.path)
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def run_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What `disttrain status` shows: the state, and for a run that says 'running' whether it is."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    report: dict[str, Any] = {"run_dir": str(run_dir), "stage": status.get("stage", "?"),
                              "state": status.get("state", "none"), "step": status.get("step")}
    for key in ("error", "reason", "checkpoint", "data"):
        if status.get(key):
            report[key] = status[key]
    checkpoints = sorted((p for p in (run_dir / "checkpoints").glob("step-*") if (p / "meta.json").is_file()),
                         key=lambda p: p.name)
    report["latest_checkpoint"] = str(checkpoints[-1]) if checkpoints else ""
    if report["state"] == "running":
        lock = _read_json(run_dir / LOCK_FILE) or {}
        holder = lock if lock.get("pid") == status.get("pid") else {
            "host": status.get("host"), "pid": status.get("pid"), "started": status.get("time", 0.0),
            "stale_after_s": max(3.0 * float(status.get("heartbeat_every_s", 30.0)), 60.0)}
        report["alive"], report["why"] = process_liveness(holder, status)
        if status.get("heartbeat"):
            report["heartbeat_age_s"] = round(time.time() - float(status["heartbeat"]), 1)
    return report


def format_report(report: dict[str, Any]) -> str:
    head = f"{report['run_dir']}: {report['stage']}, {report['state']}"
    if report.get("step") is not None:
        head += f" at step {report['step']}"
    if "alive" in report:
        head += (f" -- alive ({report['why']})" if report["alive"] else
                 f" -- DEAD ({report['why']}): nothing is running it; run the same command again to resume "
                 f"(checkpoint.resume=auto)")
    lines = [head]
    for key in ("reason", "error"):
        if report.get(key):
            lines.append(f"  {key}: {report[key]}")
    if report.get("latest_checkpoint"):
        lines.append(f"  latest checkpoint: {report['latest_checkpoint']}")
    if report.get("data"):
        lines.append("  data: " + ", ".join(f"{k} {v}" for k, v in report["data"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- status.json


class StatusFile:
    """`status.json`: state (running / preempted / stalled / failed / finished), the step, the data
    counters, and while running a heartbeat. Rank 0 writes it; `force` lets any rank record why it
    ended the run (a stall seen by a rank other than 0)."""

    def __init__(self, run_dir: Path, stage: str, writer: bool, heartbeat_s: float):
        self.path = run_dir / STATUS_FILE
        self.stage = stage
        self.writer = writer
        self.heartbeat_s = heartbeat_s
        self.doc: dict[str, Any] = {}
        self._lock = threading.Lock()

    def set(self, state: str, force: bool = False, **extra: Any) -> None:
        with self._lock:
            keep = {k: self.doc[k] for k in ("step", "data") if k in self.doc}
            now = time.time()
            self.doc = {"state": state, "stage": self.stage, "time": now, **keep, **extra,
                        "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now,
                        "heartbeat_every_s": self.heartbeat_s}
            if self.writer or force:
                files.write_json(self.path, self.doc)

    def update(self, **fields: Any) -> None:
        """Fields for the next write (the heartbeat writes them)."""
        with self._lock:
            self.doc.update(fields)

    def beat(self) -> None:
        with self._lock:
            if not self.writer or self.doc.get("state") != "running":
                return
            self.doc["heartbeat"] = time.time()
            files.write_json(self.path, self.doc)

    @property
    def state(self) -> str:
        return self.doc.get("state", "")


# --------------------------------------------------------------------------- the watchdog


class StopRequested:
    """Set by SIGTERM / SIGUSR1 (Slurm pre-emption) or by the watchdog (launcher gone); the loop
    checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.request(signum)

    def request(self, reason: int | str) -> None:
        if self.signal is None:
            self.signal = reason

    def describe(self) -> str:
        if isinstance(self.signal, int):
            return f"signal {signal.Signals(self.signal).name}"
        return str(self.signal)

    def __bool__(self) -> bool:
        return self.signal is not None


def launched_by_a_launcher() -> bool:
    """True under torchrun / accelerate launch / disttrain launch: then this process ends when its
    launcher does. A plain `python recipe.py` (perhaps under nohup) is left alone."""
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("DISTTRAIN_LAUNCHED"):
        return True
    try:
        cmdline = " ".join(psutil.Process(os.getppid()).cmdline())
    except (psutil.Error, OSError):
        return False
    return any(name in cmdline for name in ("accelerate", "torchrun", "torch.distributed.run"))


class Watchdog:
    """Progress reports from the main thread; stall, stop-grace and launcher checks in a thread."""

    def __init__(self, *, run_dir: Path, rank: int, world_size: int, status: StatusFile, stop: StopRequested,
                 stall_timeout_s: float, heartbeat_s: float, stop_grace_s: float, watch_launcher: bool,
                 latest_checkpoint: Callable[[], Path | None], on_end: Callable[[str], None]):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.status, self.stop = status, stop
        self.stall_timeout_s, self.heartbeat_s, self.stop_grace_s = stall_timeout_s, heartbeat_s, stop_grace_s
        self.latest_checkpoint, self.on_end = latest_checkpoint, on_end
        self.ranks_dir = run_dir / RANKS_DIR
        self.ranks_dir.mkdir(exist_ok=True)
        self.phase, self.step = "setup", 0
        self._since = time.monotonic()
        self._since_wall = time.time()
        self._stop_seen: float | None = None
        self._closed = threading.Event()
        self._launcher = os.getppid() if watch_launcher else None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        try:
            signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread (tests): signals are then seen only between steps
            pass
        self._thread = threading.Thread(target=self._run, name="disttrain-watchdog", daemon=True)
        self._thread.start()

    def progress(self, phase: str, step: int | None = None) -> None:
        """Called by the training code at every phase change (cheap: no I/O)."""
        self.phase = phase
        if step is not None:
            self.step = step
        self._since = time.monotonic()
        self._since_wall = time.time()

    def close(self) -> None:
        self._closed.set()
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        tick = min(1.0, self.heartbeat_s / 2)
        next_beat = 0.0
        while not self._closed.is_set():
            self._drain_signals(tick)
            if self._closed.is_set():
                return
            now = time.monotonic()
            if self._launcher is not None and os.getppid() != self._launcher:
                self.stop.request(f"the launcher (pid {self._launcher}) exited")
            if now >= next_beat:
                next_beat = now + self.heartbeat_s
                self._write_rank_file()
                self.status.beat()
            if self.stop and self._stop_seen is None:
                self._stop_seen = now
            if (self._stop_seen is not None and now - self._stop_seen > self.stop_grace_s
                    and not self._checkpoint_being_written()):
                self._end_without_checkpoint()
            if self.stall_timeout_s and now - self._since > self.stall_timeout_s and not self._others_progress():
                self._end_stalled()

    def _drain_signals(self, timeout: float) -> None:
        ready, _, _ = select.select([self._wakeup_r], [], [], timeout)
        if not ready:
            return
        try:
            data = self._wakeup_r.recv(64)
        except (BlockingIOError, OSError):
            return
        for signum in data:
            if signum in STOP_SIGNALS:
                self.stop.request(signum)

    def _write_rank_file(self) -> None:
        info = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "phase": self.phase,
                "step": self.step, "phase_since": self._since_wall, "updated": time.time()}
        try:
            files.write_json(self.ranks_dir / f"rank-{self.rank}.json", info)
        except OSError:
            pass

    def _checkpoint_being_written(self) -> bool:
        """This rank, or a responsive other one, writes checkpoint files right now (not just waits for
        the others at a barrier, which a frozen peer would make endless)."""
        if self.phase == "checkpoint":
            return True
        now = time.time()
        return any(r["phase"] == "checkpoint" and now - r["updated"] < max(3 * self.heartbeat_s, 10.0)
                   for r in self._ranks() if r["rank"] != self.rank)

    def _others_progress(self) -> bool:
        """Whether another rank made progress within the stall timeout: this one then waits for it
        (rank 0 scoring alone while the others wait at a barrier), it is not stuck."""
        now = time.time()
        return any(r["rank"] != self.rank and now - r["phase_since"] < self.stall_timeout_s
                   and now - r["updated"] < max(3 * self.heartbeat_s, 10.0) for r in self._ranks())

    def _ranks(self) -> list[dict]:
        found = [_read_json(self.ranks_dir / f"rank-{r}.json") for r in range(self.world_size)]
        return [r for r in found if r is not None]

    def diagnose(self) -> str:
        """Which rank stalled, from every rank's last report: a rank whose reports stopped (the
        process itself is frozen) or else the one whose current phase began first."""
        now = time.time()
        ranks = self._ranks()
        frozen = [r for r in ranks if now - r["updated"] > max(3 * self.heartbeat_s, 10.0)]
        missing = sorted(set(range(self.world_size)) - {r["rank"] for r in ranks})
        if frozen or missing:
            culprits = frozen
            what = "stopped responding (no report for " + ", ".join(
                f"rank {r['rank']}: {now - r['updated']:.0f} s" for r in frozen) + ")" if frozen else ""
            if missing:
                what += (" and " if what else "") + f"rank(s) {missing} never reported"
        else:
            first = min(ranks, key=lambda r: r["phase_since"]) if ranks else None
            culprits = [first] if first else []
            what = f"is stuck in '{first['phase']}'" if first else "made no progress"
        names = ", ".join(f"rank {r['rank']} (pid {r['pid']} on {r['host']}, step {r['step']})" for r in culprits)
        others = "; ".join(f"rank {r['rank']} in '{r['phase']}' for {now - r['phase_since']:.0f} s" for r in ranks)
        return f"{names or 'a rank'} {what}; every rank: {others or 'no reports'}"

    def _end_stalled(self) -> None:
        minutes = self.stall_timeout_s / 60
        latest = self.latest_checkpoint()
        message = (f"no progress on rank {self.rank} for {minutes:.1f} min (runtime.stall_timeout_minutes): "
                   f"{self.diagnose()}. Ended the run; run the same command again to resume from "
                   f"{latest or 'the start (no checkpoint yet)'}")
        self._end("stalled", message, latest)

    def _end_without_checkpoint(self) -> None:
        latest = self.latest_checkpoint()
        message = (f"stopped by {self.stop.describe()}, but no step boundary was reached within "
                   f"{self.stop_grace_s:.0f} s (runtime.stop_grace_seconds; '{self.phase}' since "
                   f"{time.monotonic() - self._since:.0f} s): ended without a new checkpoint; run the same command "
                   f"again to resume from {latest or 'the start (no checkpoint yet)'}")
        self._end("preempted", message, latest)

    def _end(self, state: str, message: str, latest: Path | None) -> None:
        try:
            self.status.set(state, force=True, error=message, checkpoint=str(latest or ""), rank=self.rank)
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            self.on_end(state)
        finally:
            record_exit(PREEMPTED_EXIT_CODE, message)
            os._exit(PREEMPTED_EXIT_CODE)
