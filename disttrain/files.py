"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The content reaches the disk (fsync) before the rename makes it visible, so a crash or a
power cut right after a write leaves the old file or the complete new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (a checkpoint before it is renamed into place)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> Path:
    """numpy arrays by name, as an .npz archive (np.load reads it back)."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    return path


def write_image_grid(path: str | os.PathLike, images: Any, nrow: int = 8) -> Path:
    """A [N, C, H, W] batch with pixels in [0, 1] as one PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(images.float().cpu(), tmp, nrow=nrow, padding=1, format="png")
    os.replace(tmp, path)
    return path
