"""Tables and plots of a run's metric history, written as MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from disttrain import files

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

CURVES = [("train/loss", "loss"), ("train/lr", "learning rate"), ("perf/samples_per_s", "samples/s (all ranks)"),
          ("perf/data_wait_frac", "data-loader wait fraction")]


def write_history(history: list[dict[str, float]], out_dir: Path) -> list[Path]:
    """`metrics.csv` (one row per log step) and `curves.png`; returns the files written."""
    if not history:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = sorted({key for row in history for key in row}, key=lambda k: (k != "step", k))
    table = files.write_csv(out_dir / "metrics.csv", history, columns)

    present = [(key, label) for key, label in CURVES if any(key in row for row in history)]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points))
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
    fig.tight_layout()
    plot = out_dir / "curves.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return [table, plot]
