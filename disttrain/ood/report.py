"""The evaluation table (Markdown, CSV, JSON) and its plots (ROC, PR, score densities)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from disttrain import files  # noqa: E402
from disttrain.ood.metrics import METRIC_KEYS  # noqa: E402

LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR95"}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per scorer x OOD set: each metric as mean +- std in percent, and ID accuracy."""
    head = ["scorer", "OOD set", *(LABELS[k] for k in METRIC_KEYS), "ID acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["scorer"], row["ood"]]
        cells += [f"{100 * row[k]:.2f} ± {100 * row[k + '_std']:.2f}" for k in METRIC_KEYS]
        cells.append(f"{100 * row['id_accuracy']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [files.write_text(out_dir / "results.md", markdown_table(rows) + "\n"),
            files.write_csv(out_dir / "results.csv", rows), files.write_json(out_dir / "results.json", rows)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_plots(scores: dict[str, dict[str, np.ndarray]], id_name: str, out_dir: Path) -> list[Path]:
    """`scores[scorer][set]` are OOD scores (higher = OOD); `id_name` is the ID set's key.

    Per OOD set: ROC and PR curves of every scorer (OOD positive). Per scorer: densities of its
    stored scores on the ID set and every OOD set (for msp that is log(1 - max softmax), which keeps
    confident inputs apart; recipes/report.py draws the paper's confidence densities, mixupoe.txt Fig. 3)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ood_names = [name for name in next(iter(scores.values())) if name != id_name]
    for ood in ood_names:
        fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4))
        for scorer, by_set in scores.items():
            y = np.r_[np.zeros(len(by_set[id_name])), np.ones(len(by_set[ood]))]
            s = np.r_[by_set[id_name], by_set[ood]]
            fpr, tpr, _ = roc_curve(y, s)
            precision, recall, _ = precision_recall_curve(y, s)
            roc_ax.plot(fpr, tpr, label=scorer)
            pr_ax.plot(recall, precision, label=scorer)
        roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        roc_ax.set(xlabel="FPR (ID flagged)", ylabel="TPR (OOD detected)", title=f"ROC: {id_name} vs {ood}")
        pr_ax.set(xlabel="recall (OOD)", ylabel="precision (OOD)", title=f"PR, OOD positive: {ood}")
        roc_ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"curves_{_safe(ood)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for scorer, by_set in scores.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        values = np.concatenate(list(by_set.values()))
        lo, hi = np.percentile(values, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for name, s in by_set.items():
            ax.hist(np.clip(s, bins[0], bins[-1]), bins=bins, density=True, histtype="step" if name != id_name else
                    "stepfilled", alpha=0.5 if name == id_name else 1.0, label=f"{name} (ID)" if name == id_name else name)
        ax.set(xlabel=f"{scorer} score (higher = more OOD)", ylabel="density", title=f"{scorer}: ID vs OOD")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"density_{_safe(scorer)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
