"""Stage: the paper's tables and confidence densities from finished evaluate runs.

Evaluate runs of any methods, training seeds and benchmarks go in; mixupoe.txt Table 5
(FPR95 / AUROC / AUPR per D_in x method x OOD set), Table 6 (ID test accuracy) and the
confidence-density grids of Figs. 3, 4 and 6 come out. Runs of one D_in (the basename of the
model's data.root) and one method are the training seeds of a cell: mean ± sample std over them.

    python recipes/report.py run_dir=runs/report/bird \
        evaluations=[runs/evaluate/bird-standard-s0,runs/evaluate/bird-standard-s1,runs/evaluate/bird-mixup_oe-s0]
    accelerate launch recipes/report.py run_dir=... evaluations=[...]    # also fine: rank 0 writes
    sbatch slurm/report.sh evaluations=[...]                             # run_dir from RUN_DIR or the job id

Method rows: a Standard classifier gives one row per scorer of `standard_scorers` it was
evaluated with (MSP, ODIN, Energy, Mahalanobis, Gram Matrices); a finetune_oe model one row,
"OE (fine-tune)", "MixupOE (scratch)", ..., scored by its method's own scorer (its card's `score`).

Output (run_dir): table5.md / .csv / .json, table6.md / .csv, densities.png (and
densities_<D_in>.png per benchmark when there are several), summary.json -- and the MLflow run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from disttrain import config
from disttrain.config import ConfigError, ReportConfig
from disttrain.ood.paper_tables import SeedRun, density_grid, density_per_ood, table1, table5, table6, write_table
from disttrain.runtime import entrypoint, read_status, start_run
from disttrain.runtime.saved import saved_model_card

# The paper's names; any other scorer or method is shown under its own name.
SCORER_LABELS = {"msp": "MSP", "odin": "ODIN", "energy": "Energy", "mahalanobis": "Mahalanobis",
                 "gram": "Gram Matrices"}
METHOD_LABELS = {"oe": "OE", "energy_oe": "EnergyOE", "mixup_oe": "MixupOE",  # in the papers' order
                 "cmg_softmax": "CMG-s", "cmg_energy": "CMG-e"}
# fine-tune rows before scratch rows; then CMG's ablations (cmg.txt Fig. 2a/b)
INIT_LABELS = {"finetune": "fine-tune", "scratch": "scratch", "finetune-no-pseudo-ood": "no pseudo-OOD",
               "unfrozen": "unfrozen", "direct": "direct"}
STANDARD = "standard"


@dataclass
class Evaluation:
    """A finished evaluate run, and what its model is."""

    run_dir: Path
    model_dir: Path  # the evaluated model's run dir
    benchmark: str  # D_in
    seed: int  # the model's runtime.seed
    method: str  # STANDARD or a finetune_oe method
    init: str  # finetune | scratch ("" for Standard)
    score: str  # the scorer a fine-tuned method is evaluated with
    id_name: str
    rows: list[dict[str, Any]]
    base_method: str = ""  # a method fine-tuned on top of another's model (CMG stage 2 on a MixupOE model)

    @property
    def label(self) -> str:
        """The model's Table 5 row and density row: Standard, OE (fine-tune), MixupOE (scratch), ..."""
        if self.method == STANDARD:
            return "Standard"
        return f"{self._base_label}{self._method_label} ({self._init_label})"

    @property
    def column(self) -> str:
        """Its Table 6 column: Standard, OE fine-tune, ..."""
        return "Standard" if self.method == STANDARD else f"{self._base_label}{self._method_label} {self._init_label}"

    @property
    def _base_label(self) -> str:
        return f"{METHOD_LABELS.get(self.base_method, self.base_method)} + " if self.base_method else ""

    @property
    def _method_label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)

    @property
    def _init_label(self) -> str:
        return INIT_LABELS.get(self.init, self.init)

    def model_rank(self) -> tuple[int, ...]:
        """Table 6 and density order: Standard, then by method, fine-tune before scratch."""
        if self.method == STANDARD:
            return (0,)
        return (1, _rank(METHOD_LABELS, self.method), _rank(INIT_LABELS, self.init))

    def seed_run(self, scorer: str) -> SeedRun:
        by_ood = {row["ood"]: row for row in self.rows if row["scorer"] == scorer}
        return SeedRun(str(self.run_dir), self.seed, float(self.rows[0]["id_accuracy"]), by_ood)

    def scores(self, scorer: str) -> dict[str, np.ndarray]:
        """`scorer`'s per-sample scores: the ID set first, then the OOD sets in results order ({} if none)."""
        path = self.run_dir / "scores.npz"
        if not path.is_file():
            return {}
        names = [self.id_name, *dict.fromkeys(row["ood"] for row in self.rows if row["scorer"] == scorer)]
        with np.load(path) as saved:
            if f"{scorer}/{self.id_name}" not in saved.files:
                return {}
            return {name: saved[f"{scorer}/{name}"] for name in names if f"{scorer}/{name}" in saved.files}


def _rank(order: dict[str, str], name: str) -> int:
    return list(order).index(name) if name in order else len(order)


# --------------------------------------------------------------------------- reading the inputs


def _read_json(path: Path, run_dir: str, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"evaluations: {run_dir} holds no {path.name} ({what}): point at a finished evaluate "
                          f"run dir")
    return json.loads(path.read_text())


def load_evaluation(run_dir: str) -> Evaluation:
    """A finished evaluate run with its model's card and config; a ConfigError naming `run_dir` otherwise."""
    saved = _read_json(Path(run_dir) / "config.json", run_dir, "not a run dir")
    if saved.get("stage") != "evaluate":
        raise ConfigError(f"evaluations: {run_dir} is a {saved.get('stage')!r} run, not an evaluate run: point at "
                          f"a finished evaluate run dir (recipes/evaluate.py)")
    state = read_status(run_dir).get("state", "missing")
    if state != "finished":
        raise ConfigError(f"evaluations: {run_dir} is an evaluate run that has not finished (status: {state}): "
                          f"point at a finished evaluate run, or finish this one first")
    rows = _read_json(Path(run_dir) / "results.json", run_dir, "the evaluate run wrote no results")
    if not rows:
        raise ConfigError(f"evaluations: {run_dir} has an empty results.json: re-run that evaluation")
    model_dir, id_spec = saved["config"]["model"], saved["config"]["id"]
    try:
        card = saved_model_card(model_dir)
    except ConfigError as err:
        raise ConfigError(f"evaluations: {run_dir} evaluated model={model_dir}: {err}") from None
    model_cfg_path = Path(model_dir) / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text()).get("config", {}) if model_cfg_path.is_file() else {}
    data_root = model_cfg.get("data.root") or str(Path(id_spec).parent)  # no config: the ID set's dataset dir
    ev = Evaluation(Path(run_dir), Path(model_dir), Path(data_root).name, int(model_cfg.get("runtime.seed", 0)),
                    card.method or STANDARD, card.details.get("init", ""), card.score or "msp", rows[0]["id"], rows,
                    card.details.get("base_method", ""))
    if ev.method != STANDARD and not ev.seed_run(ev.score).by_ood:
        raise ConfigError(f"evaluations: {run_dir} holds no {ev.score!r} results, the scorer {ev.label} is "
                          f"evaluated with: re-run it with scorers=[{ev.score},...]")
    return ev


def check_distinct(evaluations: list[Evaluation]) -> None:
    """Every evaluate run and every model once: a repeat would count as a further seed."""
    for kind, names in (("evaluate run", [str(ev.run_dir.resolve()) for ev in evaluations]),
                        ("model", [str(ev.model_dir.resolve()) for ev in evaluations])):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"evaluations: the {kind} {repeated[0]} appears more than once, and would count as "
                              f"another training seed: list each once")


# --------------------------------------------------------------------------- the tables' cells


def table5_cells(evaluations: list[Evaluation], standard_scorers: list[str],
                 note: Callable[[str], Any]) -> dict[tuple[str, str], list[SeedRun]]:
    """(D_in, method row) -> its seeds' results; D_in in first-seen order, rows in the paper's order."""
    benchmarks = list(dict.fromkeys(ev.benchmark for ev in evaluations))
    ranked: dict[tuple[str, str], tuple[tuple[int, ...], list[SeedRun]]] = {}
    for ev in sorted(evaluations, key=lambda ev: ev.seed):
        if ev.method == STANDARD:
            rows = [(SCORER_LABELS.get(s, s), s, (0, i)) for i, s in enumerate(standard_scorers)
                    if ev.seed_run(s).by_ood]
            if not rows:
                note(f"note: {ev.run_dir} (Standard) has none of standard_scorers={standard_scorers}: "
                     f"it is left out of Table 5")
        else:
            rank = (1, _rank(INIT_LABELS, ev.init), _rank(METHOD_LABELS, ev.method))
            rows = [(ev.label, ev.score, rank)]
        for label, scorer, rank in rows:
            key = (ev.benchmark, label)
            ranked.setdefault(key, ((benchmarks.index(ev.benchmark), *rank), []))[1].append(ev.seed_run(scorer))
    return {key: runs for key, (_, runs) in sorted(ranked.items(), key=lambda item: item[1][0])}


def model_groups(evaluations: list[Evaluation]) -> dict[tuple[str, str], list[Evaluation]]:
    """(D_in, model label) -> its seeds, lowest seed first; D_in in first-seen order, models in Table 6 order."""
    benchmarks = list(dict.fromkeys(ev.benchmark for ev in evaluations))
    ordered = sorted(evaluations, key=lambda ev: (benchmarks.index(ev.benchmark), ev.model_rank(), ev.seed))
    groups: dict[tuple[str, str], list[Evaluation]] = {}
    for ev in ordered:
        groups.setdefault((ev.benchmark, ev.label), []).append(ev)
    return groups


def table6_cells(evaluations: list[Evaluation]) -> tuple[dict[tuple[str, str], list[SeedRun]], list[str]]:
    groups = model_groups(evaluations)
    cells = {(benchmark, runs[0].column): [ev.seed_run(ev.score) for ev in runs]
             for (benchmark, _), runs in groups.items()}
    columns = list(dict.fromkeys(ev.column for ev in sorted(evaluations, key=Evaluation.model_rank)))
    return cells, columns


def headline_rows(cells: dict[tuple[str, str], list[SeedRun]]) -> list[dict[str, Any]]:
    """Table 5 in one number per metric: per (D_in, method row), the mean over its seeds and OOD sets."""
    rows = []
    for (benchmark, label), runs in cells.items():
        results = [row for run in runs for row in run.by_ood.values()]
        rows.append({"dataset": benchmark, "method": label, "seeds": len(runs),
                     "ood_sets": len({ood for run in runs for ood in run.by_ood}),
                     "auroc": float(np.mean([r["auroc"] for r in results])),
                     "fpr95": float(np.mean([r["fpr95"] for r in results])),
                     "aupr_out": float(np.mean([r["aupr_out"] for r in results])),
                     "id_accuracy": float(np.mean([run.accuracy for run in runs]))})
    return rows


def headline_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """`headline/<D_in>/<method>/<metric>`, in the characters MLflow allows in a metric name."""
    def safe(text: str) -> str:
        return re.sub(r"[^\w.\- ]", "_", text.replace("(", "").replace(")", ""))

    return {f"headline/{safe(row['dataset'])}/{safe(row['method'])}/{key}": row[key] for row in rows
            for key in ("auroc", "fpr95", "aupr_out", "id_accuracy")}


# --------------------------------------------------------------------------- densities


def write_densities(evaluations: list[Evaluation], scorer: str, out_dir: Path,
                    note: Callable[[str], Any]) -> list[Path]:
    """densities.png: one row per model (its first seed) and benchmark; with several benchmarks
    also densities_<D_in>.png each."""
    by_benchmark: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for (benchmark, label), runs in model_groups(evaluations).items():
        scores = runs[0].scores(scorer)
        if not scores:
            note(f"note: {runs[0].run_dir} has no {scorer!r} scores in scores.npz: {label} on {benchmark} is left "
                 f"out of the densities")
            continue
        by_benchmark.setdefault(benchmark, {})[label] = scores
    if not by_benchmark:
        return []
    # one readable figure per OOD set and benchmark (densities/), beside the paper's grid
    per_ood = [path for benchmark, rows in by_benchmark.items()
               for path in density_per_ood(rows, scorer, out_dir / "densities" / _file_safe(benchmark),
                                           title=f"D_in = {benchmark}")]
    if len({ev.benchmark for ev in evaluations}) == 1:
        (benchmark, rows), = by_benchmark.items()
        return [density_grid(rows, scorer, out_dir / "densities.png", title=f"D_in = {benchmark}"), *per_ood]
    every = {f"{benchmark}: {label}": scores for benchmark, rows in by_benchmark.items()
             for label, scores in rows.items()}
    paths = [density_grid(every, scorer, out_dir / "densities.png")]
    paths += [density_grid(rows, scorer, out_dir / f"densities_{_file_safe(benchmark)}.png",
                           title=f"D_in = {benchmark}") for benchmark, rows in by_benchmark.items()]
    return paths + per_ood


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w-]", "_", name)


# --------------------------------------------------------------------------- the stage


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(ReportConfig, argv)
    # -- every input checked before the run starts ------------------------------------------------
    evaluations = [load_evaluation(run_dir) for run_dir in cfg.evaluations]
    check_distinct(evaluations)

    ranked = sorted(evaluations, key=Evaluation.model_rank)  # what it compares, in the tables' order
    tags = {"disttrain.method": ",".join(dict.fromkeys(ev.method for ev in ranked)),
            "disttrain.dataset": ",".join(dict.fromkeys(ev.benchmark for ev in evaluations))}
    with start_run(cfg, tags=tags) as run:
        summary: dict[str, Any] = {}
        if run.is_main:
            cells = table5_cells(evaluations, cfg.standard_scorers, run.print)
            paper5, paper1 = table5(cells), table1(cells)
            paper6 = table6(*table6_cells(evaluations))
            written = [*write_table(paper5, run.run_dir, "table5", json_too=True),
                       *write_table(paper6, run.run_dir, "table6"),
                       *write_table(paper1, run.run_dir, "table1", json_too=True)]
            if cfg.plots:
                written += write_densities(evaluations, cfg.density_scorer, run.run_dir, run.print)
            for path in written:  # densities/<D_in>/<OOD set>.png keep their folder in MLflow
                run.save_artifact(path, str(path.parent.relative_to(run.run_dir)) if path.parent != run.run_dir
                                  else None)
            run.print(f"\nTable 5 (mixupoe.txt)\n\n{paper5.markdown()}\n\nTable 6 (mixupoe.txt)\n\n"
                      f"{paper6.markdown()}\n\nTable 1 (cmg.txt)\n\n{paper1.markdown()}")
            rows = headline_rows(cells)
            run.log(headline_metrics(rows), 0)
            run.log_table(rows, "headline.json")  # `disttrain pipeline end` copies it, and the metrics, to the parent
            summary = {"evaluations": len(evaluations), "benchmarks": len({ev.benchmark for ev in evaluations}),
                       "table5_rows": len(paper5.rows), "files": [path.name for path in written]}
        best = max(rows, key=lambda row: row["auroc"]) if run.is_main and rows else None
        run.finish(summary, step=0, headline=f"{len(evaluations)} evaluation(s); best mean AUROC {best['auroc']:.4f} "
                                             f"({best['method']} on {best['dataset']})" if best else "")
        run.print_summary({"table 5": str(run.run_dir / "table5.md"), "table 6": str(run.run_dir / "table6.md"),
                           "table 1": str(run.run_dir / "table1.md")})


if __name__ == "__main__":
    entrypoint(main)
