"""The paper's aggregate tables and confidence-density grids over training seeds.

    table5(cells)            mixupoe.txt Table 5: FPR95 / AUROC / AUPR per (D_in, method) x OOD set
    table6(cells, columns)   mixupoe.txt Table 6: ID test accuracy per D_in x method
    density_grid(rows, ...)  mixupoe.txt Figs. 3, 4, 6: confidence densities, one row per model

A cell of a table is a list of `SeedRun`s, one per training seed; it shows mean ± sample
std (ddof=1) over them. Inputs are plain values: reading run dirs is the recipe's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from disttrain import files  # noqa: E402
from disttrain.ood.scorers import MSP  # noqa: E402

TABLE5_METRICS = ("fpr95", "auroc", "aupr_out")  # the paper's order: FPR95↓ / AUROC↑ / AUPR↑ (OOD positive)
MISSING = "-"
SINGLE = "†"  # marks a Table 5 row whose ± is over evaluation draws, not seeds
DENSITY_BINS = 50


@dataclass
class SeedRun:
    """One training seed's evaluation: its result rows of one scorer, by OOD set."""

    name: str  # the evaluate run dir, for the JSON record
    seed: int
    accuracy: float  # ID test accuracy in [0, 1]
    by_ood: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Stat:
    mean: float
    std: float
    over: str  # "seeds": sample std over seeds; "draws": one seed, std over its draws; "none": one seed, no std

    def text(self) -> str:
        return f"{100 * self.mean:.1f}" if self.over == "none" else f"{100 * self.mean:.1f}±{100 * self.std:.1f}"

    def record(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "std_over": self.over}


def seed_stat(values: list[float], draw_stds: list[float] | None = None) -> Stat:
    """Mean ± sample std over seeds; one seed: its std over draws if given, else no std."""
    if len(values) >= 2:
        return Stat(float(np.mean(values)), float(np.std(values, ddof=1)), "seeds")
    if draw_stds:
        return Stat(float(values[0]), float(draw_stds[0]), "draws")
    return Stat(float(values[0]), 0.0, "none")


@dataclass
class Table:
    """Display cells (Markdown, CSV), a JSON record per row, and the footnotes."""

    header: list[str]
    rows: list[list[str]]
    records: list[dict[str, Any]]
    notes: list[str]
    marks: list[str] = field(default_factory=list)  # per row, a footnote mark after its second cell (Markdown)
    blank_repeats: int = 0  # Markdown leaves the first k cells blank where they repeat the row above (like D_in)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        previous: list[str] = []
        for row, mark in zip(self.rows, self.marks or [""] * len(self.rows)):
            shown = [("" if i < self.blank_repeats and previous[:i + 1] == row[:i + 1] else cell)
                     for i, cell in enumerate(row)]
            shown[1] += f" {mark}" if mark else ""
            lines.append("| " + " | ".join(shown) + " |")
            previous = row
        return "\n".join(lines + [""] + [f"{note}  " for note in self.notes])

    def csv_rows(self) -> list[dict[str, str]]:
        return [dict(zip(self.header, row)) for row in self.rows]


def write_table(table: Table, out_dir: Path, name: str, json_too: bool = False) -> list[Path]:
    """<name>.md and <name>.csv (and <name>.json: the records) in `out_dir`, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [files.write_text(out_dir / f"{name}.md", table.markdown() + "\n"),
               files.write_csv(out_dir / f"{name}.csv", table.csv_rows(), table.header)]
    if json_too:
        written.append(files.write_json(out_dir / f"{name}.json", {"rows": table.records, "notes": table.notes}))
    return written


# --------------------------------------------------------------------------- Table 5


def _ood_names(cells: dict[tuple[str, str], list[SeedRun]]) -> list[str]:
    """Every OOD set, in the order the runs' results first list it."""
    return list(dict.fromkeys(ood for runs in cells.values() for run in runs for ood in run.by_ood))


def metric_stat(runs: list[SeedRun], ood: str, key: str) -> Stat | None:
    rows = [run.by_ood[ood] for run in runs if ood in run.by_ood]
    if not rows:
        return None
    return seed_stat([row[key] for row in rows], [row.get(f"{key}_std", 0.0) for row in rows])


def table5(cells: dict[tuple[str, str], list[SeedRun]]) -> Table:
    """Rows: (D_in, method) in the order given; columns: OOD sets; cells FPR95 / AUROC / AUPR-Out in %."""
    oods = _ood_names(cells)
    rows, records, marks, singles = [], [], [], []
    for (benchmark, method), runs in cells.items():
        stats = {ood: {key: metric_stat(runs, ood, key) for key in TABLE5_METRICS} for ood in oods}
        texts = {ood: " / ".join(s.text() for s in by_key.values()) if by_key["auroc"] else MISSING
                 for ood, by_key in stats.items()}
        marks.append(SINGLE if len(runs) == 1 else "")
        if len(runs) == 1:
            draws = {row.get("num_draws", "?") for row in runs[0].by_ood.values()}
            singles.append(f"{method} on {benchmark} ({'/'.join(map(str, sorted(draws, key=str)))} draws)")
        rows.append([benchmark, method, str(len(runs)), *(texts[ood] for ood in oods)])
        records.append({"benchmark": benchmark, "method": method, "num_seeds": len(runs),
                        "seeds": [run.seed for run in runs], "evaluations": [run.name for run in runs],
                        "cells": {ood: {"text": texts[ood], **{k: s.record() for k, s in by_key.items() if s}}
                                  for ood, by_key in stats.items()}})
    notes = ["Each cell: FPR95↓ / AUROC↑ / AUPR↑ in %, OOD as the positive class (AUPR = AUPR-Out); "
             "mean ± sample std (ddof=1) over training seeds, each seed's value being its mean over the "
             "evaluation draws."]
    if singles:
        notes.append(f"{SINGLE} One training seed only: ± is that run's std over its evaluation draws, "
                     f"not over seeds: {'; '.join(singles)}.")
    return Table(["D_in", "Method", "seeds", *oods], rows, records, notes, marks, blank_repeats=1)


# --------------------------------------------------------------------------- Table 1 (cmg.txt)

# a Setting-1 benchmark: one known/unknown partition of a dataset, named <dataset>-p<k> (cifar10-p3)
PARTITION_NAME = re.compile(r"^(?P<dataset>.+?)[-_]p(?P<index>\d+)$")


def dataset_of(benchmark: str) -> str:
    """`cifar10` for the partition benchmark `cifar10-p3`; any other name unchanged."""
    match = PARTITION_NAME.match(benchmark)
    return match["dataset"] if match else benchmark


def table1(cells: dict[tuple[str, str], list[SeedRun]], metric: str = "auroc") -> Table:
    """cmg.txt Table 1: rows (D_in, OOD set), one column per method, AUROC in %. The partitions of a
    dataset (<dataset>-p1 ... -p5, Setting 1) are averaged per seed first; then mean ± sample std
    over seeds (the paper's 5 repeats). A last row averages each method's cells."""
    methods = list(dict.fromkeys(method for _, method in cells))
    per_seed: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}
    partitions: dict[str, set[str]] = {}
    for (benchmark, method), runs in cells.items():
        dataset = dataset_of(benchmark)
        partitions.setdefault(dataset, set()).add(benchmark)
        for run in runs:
            for ood, row in run.by_ood.items():
                seeds = per_seed.setdefault((dataset, ood), {}).setdefault(method, {})
                seeds.setdefault(run.seed, []).append(float(row[metric]))
    rows, records, means = [], [], {method: [] for method in methods}
    for (dataset, ood), by_method in per_seed.items():
        stats = {m: seed_stat([float(np.mean(v)) for v in by_method[m].values()]) if m in by_method else None
                 for m in methods}
        for method, stat in stats.items():
            if stat is not None:
                means[method].append(stat.mean)
        rows.append([dataset, ood, *(s.text() if s else MISSING for s in stats.values())])
        records.append({"dataset": dataset, "ood": ood, "partitions": sorted(partitions[dataset]),
                        **{m: {**s.record(), "num_seeds": len(by_method[m])} for m, s in stats.items() if s}})
    rows.append(["Average", "", *(f"{100 * np.mean(v):.1f}" if v else MISSING for v in means.values())])
    notes = [f"{metric.upper()} in %, OOD as the positive class; mean ± sample std (ddof=1) over training seeds. "
             f"A dataset named <dataset>-p<k> is one partition of Setting 1: its partitions are averaged per "
             f"seed first (cmg.txt Table 1)."]
    return Table(["D_in", "OOD", *methods], rows, records, notes, blank_repeats=1)


# --------------------------------------------------------------------------- Table 6


def table6(cells: dict[tuple[str, str], list[SeedRun]], columns: list[str]) -> Table:
    """Rows: D_in (first-seen order); columns: the methods in `columns` that have runs; ID accuracy in %."""
    benchmarks = list(dict.fromkeys(benchmark for benchmark, _ in cells))
    present = [c for c in columns if any((b, c) in cells for b in benchmarks)]
    rows, records = [], []
    for benchmark in benchmarks:
        stats = {c: seed_stat([run.accuracy for run in cells[benchmark, c]]) if (benchmark, c) in cells else None
                 for c in present}
        rows.append([benchmark, *(s.text() if s else MISSING for s in stats.values())])
        records.append({"benchmark": benchmark, **{c: s.record() for c, s in stats.items() if s}})
    notes = ["ID test accuracy in %, mean ± sample std (ddof=1) over training seeds."]
    if any(len(runs) == 1 for runs in cells.values()):
        notes.append("A value without ± is a single training seed.")
    return Table(["D_in", *present], rows, records, notes)


# --------------------------------------------------------------------------- confidence densities


def density_values(rows: dict[str, dict[str, np.ndarray]], scorer: str
                   ) -> tuple[dict[str, dict[str, np.ndarray]], tuple[float, float], str]:
    """What `density_grid` plots: the values per row and set, their x range and the x label.

    For msp, the confidence (max softmax probability, `MSP.confidence`: the scores are stored as
    log(1 - max softmax)) on [0, 1]; any other scorer its stored score, on the range of all its values."""
    if scorer == MSP.name:
        values = {label: {name: MSP.confidence(np.asarray(s, dtype=np.float64)) for name, s in by_set.items()}
                  for label, by_set in rows.items()}
        return values, (0.0, 1.0), "confidence (max softmax prob.)"
    every = np.concatenate([s for by_set in rows.values() for s in by_set.values()])
    lo, hi = float(every.min()), float(every.max())
    return rows, (lo, hi if hi > lo else lo + 1.0), f"{scorer} score (higher = more OOD)"


def density_grid(rows: dict[str, dict[str, np.ndarray]], scorer: str, path: Path, title: str = "") -> Path:
    """One row per model (`rows[label]`: its ID set first, then its OOD sets, as stored OOD scores);
    columns: the ID set, then every OOD set any row has. Histograms, density=True, 50 bins, of
    `density_values`: for msp the confidence on [0, 1], for any other scorer its raw score."""
    oods = list(dict.fromkeys(name for by_set in rows.values() for name in list(by_set)[1:]))
    values, (lo, hi), xlabel = density_values(rows, scorer)
    fig, axes = plt.subplots(len(rows), 1 + len(oods), figsize=(2.4 * (1 + len(oods)), 1.9 * len(rows)),
                             squeeze=False, sharex=True)
    for ax_row, (label, by_set) in zip(axes, values.items()):
        id_name = next(iter(by_set))
        panels = {id_name: ax_row[0], **{name: ax for name, ax in zip(oods, ax_row[1:])}}
        for name, ax in panels.items():
            if name not in by_set:
                ax.set_axis_off()
                continue
            ax.hist(np.clip(by_set[name], lo, hi), bins=DENSITY_BINS, range=(lo, hi), density=True,
                    color="tab:blue" if name == id_name else "tab:orange")
            ax.set_title(f"ID: {name}" if name == id_name else name, fontsize=8)
            ax.tick_params(labelsize=6)
        ax_row[0].set_ylabel(f"{label}\ndensity", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # atomic, like disttrain.files
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def density_per_ood(rows: dict[str, dict[str, np.ndarray]], scorer: str, out_dir: Path, title: str = "") -> list[Path]:
    """What `density_grid` shows, one figure per OOD set (out_dir/<set>.png): a panel per model with
    its ID density and that set's overlaid, large enough to read in MLflow's artifact preview."""
    oods = list(dict.fromkeys(name for by_set in rows.values() for name in list(by_set)[1:]))
    values, (lo, hi), xlabel = density_values(rows, scorer)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ood in oods:
        shown = {label: by_set for label, by_set in values.items() if ood in by_set}
        columns = min(len(shown), 3)
        lines = -(-len(shown) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False, sharex=True)
        for ax in axes.flat[len(shown):]:
            ax.set_axis_off()
        for ax, (label, by_set) in zip(axes.flat, shown.items()):
            id_name = next(iter(by_set))
            ax.hist(np.clip(by_set[id_name], lo, hi), bins=DENSITY_BINS, range=(lo, hi), density=True,
                    color="tab:blue", alpha=0.6, label=f"ID: {id_name}")
            ax.hist(np.clip(by_set[ood], lo, hi), bins=DENSITY_BINS, range=(lo, hi), density=True,
                    color="tab:orange", alpha=0.6, label=f"OOD: {ood}")
            ax.set_title(label, fontsize=10)
            ax.set(xlabel=xlabel, ylabel="density")
            ax.legend(fontsize=8)
        fig.suptitle(f"{title + ': ' if title else ''}ID vs {ood}", fontsize=12)
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^\w-]", "_", ood) + ".png")
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
