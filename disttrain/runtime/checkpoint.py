"""Atomic, verified, resumable checkpoints of the full training state.

A checkpoint is what `Accelerator.save_state` writes (every prepared model, optimizer and
scaler, the RNG states of every rank, DeepSpeed/FSDP shards) plus disttrain's own states
(loop counters and data position, the LR schedule, the EMA, ...) under `states/` as
JSON + safetensors (`disttrain.runtime.statefile`: nothing of ours is ever unpickled). It is
written into `checkpoints/.tmp-step-N`; every file is fsynced; `meta.json` lists every
file with its size and sha256; then the folder is renamed to `checkpoints/step-N` in one
`os.replace` and the parent directory is fsynced. A crash while saving leaves only a
`.tmp-*` folder, which is never read and is removed at the next start.

On resume (`checkpoint.resume=auto`) the newest checkpoint whose files all match their
checksums -- and which holds no file it did not write -- is loaded; a damaged one (a
truncated `model.safetensors`, a planted pickle) is renamed `damaged-step-N`, out of the
rotation, and named in a warning. The run dir must be on a filesystem every node sees.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator

from disttrain import files
from disttrain.runtime.statefile import load_state, save_state

META = "meta.json"
STATES = "states"
DAMAGED = "damaged-"
# the classes DeepSpeed's ZeRO checkpoint files hold besides tensors and containers
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _contents(folder: Path) -> list[str]:
    """Every file under `folder` but meta.json, as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p != folder / META)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` must not be loaded, or None when every file verifies."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        return f"{META} is unreadable ({err})"
    listed = meta.get("files")
    if not isinstance(listed, dict):
        return ("it was written by an older disttrain, without checksums and with pickled loop state, "
                "which is no longer loaded")
    present = set(_contents(path))
    for rel, info in listed.items():
        if rel not in present:
            return f"{rel} is missing"
        size = (path / rel).stat().st_size
        if size != info.get("size"):
            return f"{rel} has {size} bytes, {info.get('size')} when it was written"
    unexpected = sorted(present - set(listed))
    if unexpected:
        return f"it holds {unexpected[0]}, which the checkpoint did not write (refused: it could be made to run code)"
    for rel, info in listed.items():
        if _sha256(path / rel) != info.get("sha256"):
            return f"{rel} does not match its sha256"
    return None


class Checkpointer:
    def __init__(self, accelerator: Accelerator, run_dir: Path, keep_last: int,
                 every_steps: int, every_minutes: float, progress: Callable[[str], None] = lambda phase: None):
        """`progress(phase)` tells the watchdog whether this rank writes ('checkpoint': let it finish even
        after a stop signal) or waits for the others ('checkpoint wait': a frozen peer must not hold it)."""
        self.accelerator = accelerator
        self.progress = progress
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self.states: dict[str, Any] = {}  # name -> object with state_dict / load_state_dict
        self._last_save = time.monotonic()
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    def register(self, name: str, obj: Any) -> None:
        """An object of ours (state_dict / load_state_dict) saved as JSON + safetensors under states/."""
        if name in self.states:
            raise ValueError(f"a state named {name!r} is already registered")
        self.states[name] = obj

    def time_due(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds

    def step_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, meta: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        main = self.accelerator.is_main_process
        if main and tmp.exists():
            shutil.rmtree(tmp)
        self._barrier()
        # a second signal during the write must not leave a half-written checkpoint behind
        with _signals_deferred():
            self.progress("checkpoint")
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            if main:
                for name, obj in self.states.items():
                    save_state(tmp / STATES / name, obj.state_dict())
            # nobody walks the folder while a rank still writes into it (a state file renamed
            # into place under a walking rank would vanish from its listing)
            self._barrier()
            files.fsync_tree(tmp)  # every rank: the files are on disk before rank 0 lists them
            self._barrier()
            if main:
                self.progress("checkpoint")
                listed = {rel: {"size": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
                          for rel in _contents(tmp)}
                files.write_json(tmp / META, {"step": step, "time": time.time(), **meta, "files": listed})
                files.fsync_dir(tmp)
                if final.exists():  # same step saved again (e.g. end of run right after a periodic save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                files.fsync_dir(self.root)
                for old in complete_checkpoints(self.root)[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            self._barrier()
        self._last_save = time.monotonic()
        return final

    def _barrier(self) -> None:
        self.progress("checkpoint wait")
        self.accelerator.wait_for_everyone()

    def update_meta(self, path: Path, extra: dict) -> None:
        """Add to a saved checkpoint's meta.json (not checksummed itself), e.g. the final evaluation."""
        if self.accelerator.is_main_process:
            meta = json.loads((path / META).read_text())
            files.write_json(path / META, {**meta, **extra})

    def latest(self) -> Path | None:
        """The newest complete checkpoint (not verified: for messages)."""
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def choose(self, choice: str) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from for `checkpoint.resume=choice` (auto | never | a path) and
        warnings. auto: the newest that verifies; damaged ones are renamed out of the rotation.
        An explicit path that does not verify is a ValueError. Rank 0 only (it reads every file)."""
        if choice == "never":
            return None, []
        if choice != "auto":
            problem = checkpoint_problem(Path(choice))
            if problem:
                raise ValueError(f"checkpoint.resume={choice!r} cannot be loaded: {problem}")
            return Path(choice), []
        notes = []
        for candidate in reversed(complete_checkpoints(self.root)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate, notes
            damaged = candidate.with_name(DAMAGED + candidate.name)
            shutil.rmtree(damaged, ignore_errors=True)
            os.replace(candidate, damaged)
            notes.append(f"warning: skipped checkpoint {candidate.name}: {problem}; kept as {damaged} for a look")
        return None, notes

    def load(self, path: Path) -> dict:
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); "
                                    f"complete ones here: {[p.name for p in complete_checkpoints(self.root)]}")
        planted = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if planted:  # Accelerate would unpickle these without restriction; disttrain never writes them
            raise ValueError(f"{path} holds {', '.join(planted)}, which disttrain never writes and Accelerate would "
                             f"unpickle (running any code in it): refused. Remove the file(s) or resume from "
                             f"another checkpoint")
        with _weights_only_deepspeed_loads(self.accelerator):
            self.accelerator.load_state(str(path))
        for name, obj in self.states.items():
            stem = path / STATES / name
            if not stem.with_suffix(".json").is_file():
                raise FileNotFoundError(f"{path} holds no {name!r} state ({stem}.json): it was saved by a stage "
                                        f"with other parts; resume it with the same settings")
            obj.load_state_dict(load_state(stem))
        self._last_save = time.monotonic()
        return json.loads((path / META).read_text())


@contextmanager
def _weights_only_deepspeed_loads(accelerator: Accelerator) -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with a full (code-running) torch.load, which runs whatever
    code a file carries; make its engines read them with torch's weights-only unpickler instead,
    admitting only the DeepSpeed classes those files hold (Accelerate's own files already load so)."""
    engines = [m for m in getattr(accelerator, "_models", []) if getattr(m, "checkpoint_engine", None) is not None]
    if not engines:
        yield
        return
    allowed = [getattr(importlib.import_module(module), name)
               for module, name in (qualified.rsplit(".", 1) for qualified in DEEPSPEED_SAFE_GLOBALS)]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    saved = [(engine.checkpoint_engine, engine.checkpoint_engine.load) for engine in engines]
    for checkpoint_engine, _ in saved:
        checkpoint_engine.load = load
    try:
        yield
    finally:
        for checkpoint_engine, original in saved:
            checkpoint_engine.load = original


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
