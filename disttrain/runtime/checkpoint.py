"""Atomic, resumable checkpoints of the full training state.

A checkpoint is what `Accelerator.save_state` writes (every prepared model, optimizer and
scaler, the RNG states of every rank, DeepSpeed/FSDP shards, and every object registered
with `register_for_checkpointing`: schedulers, the EMA, the loop's counters and data
position), written into `checkpoints/.tmp-step-N`, completed with `meta.json`, then
renamed to `checkpoints/step-N` in one `os.replace`. A crash while saving leaves only a
`.tmp-*` folder, which is never read and is removed at the next start. The run dir must be
on a filesystem every node sees (as on any Slurm cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from accelerate import Accelerator

META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class Checkpointer:
    def __init__(self, accelerator: Accelerator, run_dir: Path, keep_last: int,
                 every_steps: int, every_minutes: float):
        self.accelerator = accelerator
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self._last_save = time.monotonic()
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    def time_due(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds

    def step_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, meta: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        # a second signal during the write must not leave a half-written checkpoint behind
        with _signals_deferred():
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                (tmp / META).write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2))
                if final.exists():  # same step saved again (e.g. end of run right after a periodic save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in complete_checkpoints(self.root)[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            self.accelerator.wait_for_everyone()
        self._last_save = time.monotonic()
        return final

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(self, path: Path) -> dict:
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); "
                                    f"complete ones here: {[p.name for p in complete_checkpoints(self.root)]}")
        self.accelerator.load_state(str(path))
        self._last_save = time.monotonic()
        return json.loads((path / META).read_text())


class _signals_deferred:
    """Hold SIGTERM/SIGUSR1 until the block ends; they are re-raised afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self._pending: list[int] = []
        self._old = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, lambda s, _f: self._pending.append(s))
            except ValueError:  # not the main thread: nothing to defer
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        for sig in self._pending:
            os.kill(os.getpid(), sig)
        return False
