"""Stage: evaluate OOD detection with a detector (disttrain.ood.detectors).

The detector is the network saved in `model=` (or `detector=`: a finished stage whose card
names another detector kind), by default a classifier with post-hoc scorers. One pass of the
(frozen) detector over the ID test set and every OOD set, on all ranks; fitted first, where it
needs ID statistics, on the ID *training* split; AUROC, AUPR-In, AUPR-Out and FPR@95TPR at the
ID:OOD base rate (mean +- std over seeded draws) and ID accuracy go into one table.

    accelerate launch --multi_gpu --num_processes 8 recipes/evaluate.py --preset mixupoe \
        model=runs/train_classifier/bird id=/data/shards/cub/test fit=/data/shards/cub/train \
        ood=[/data/shards/cub/holdout,/data/places365,/data/dtd/images,noise:gaussian]
    sbatch slurm/evaluate.sh --preset mixupoe model=... id=... fit=... ood=[...]

`interpolate=[0.5,0.6,0.7]` adds pixel-space interpolations of ID test images with an OOD set
(mixupoe.txt Fig. 4) as further OOD sets.

Output (run_dir): results.md / .csv / .json, scores.npz (every sample's score per scorer and
set, for recipes/report.py), plots/ (ROC, PR, score densities), summary.json -- and the MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from disttrain import config, files
from disttrain.config import ConfigError, EvaluateConfig
from disttrain.data.shards import MANIFEST, DataError
from disttrain.data.sources import EvalSource, interpolated_source, open_source
from disttrain.data.stream import check_damage
from disttrain.data.transforms import eval_transform
from disttrain.models.cards import ModelCard
from disttrain.ood import detectors
from disttrain.ood.detectors import concat_outputs, take_outputs
from disttrain.ood.metrics import ood_metrics
from disttrain.ood.report import markdown_table, write_plots, write_tables
from disttrain.runtime import entrypoint, start_run
from disttrain.runtime.saved import saved_model_card


def saved_card(run_dir: str, option: str) -> ModelCard:
    try:
        return saved_model_card(run_dir)
    except ConfigError as err:
        raise ConfigError(f"{option}={run_dir!r}: {err}") from None


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(EvaluateConfig, argv)
    # -- every input checked before the long pass --------------------------------------------
    source_dir = cfg.detector or cfg.model
    card = saved_card(source_dir, "detector" if cfg.detector else "model")
    detector = detectors.build(card, source_dir, scorers=list(cfg.scorers), scorer_args=cfg.scorer_args,
                               use_ema=cfg.use_ema, channels_last=cfg.runtime.channels_last)
    cfg.scorers = list(detector.names)  # the scores the table will hold, as the run's config records them
    image_size = card.image_size
    id_set = open_source(cfg.id, image_size)
    ood_sets = [open_source(spec, image_size) for spec in cfg.ood]
    if cfg.interpolate:
        mixed_in = ood_sets[cfg.ood.index(cfg.interpolate_with) if cfg.interpolate_with else -1]
        ood_sets += [interpolated_source(id_set, mixed_in, lam, cfg.interpolate_max) for lam in cfg.interpolate]
    names = [id_set.name] + [s.name for s in ood_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation sets need distinct names, got {names}: rename a folder or drop a duplicate")
    if detector.fit_passes and not cfg.fit:
        raise ConfigError(f"scorers {detector.fitting} fit ID statistics: pass fit=<the ID training split> "
                          f"(never the test set), or drop them from scorers")
    if detector.fit_passes and Path(cfg.fit).resolve() == Path(cfg.id).resolve():
        raise ConfigError(f"fit={cfg.fit!r} is the ID test set: scorers must fit on the ID training split")
    fit_set = open_source(cfg.fit, image_size) if detector.fit_passes else None

    model_cfg = Path(source_dir) / "config.json"
    model_root = json.loads(model_cfg.read_text()).get("config", {}).get("data.root", "") if model_cfg.is_file() else ""
    tags = {"disttrain.method": card.method or "standard",  # what the evaluated model is, and its ID data
            "disttrain.dataset": Path(model_root or Path(cfg.id).parent).name}
    with start_run(cfg, model_card=card, tags=tags) as run:
        for context, source in [("fit", fit_set), ("evaluation", id_set), *(("evaluation", s) for s in ood_sets)]:
            if source is not None:
                manifest = Path(source.spec) / MANIFEST
                run.log_dataset("id" if source is id_set else "fit" if context == "fit" else "ood", source.spec,
                                context, json.loads(manifest.read_text()) if manifest.is_file() else None,
                                source.num_samples)
        # -- the frozen detector: never prepared, the same weights on every rank ------------------
        detector.keep_outputs_on_device = run.world_size == 1  # features, fit and scores stay on the device
        detector.setup(run.device)
        norm = card.normalization
        transform = eval_transform(image_size, card.resize_size, norm["mean"], norm["std"])

        def outputs_of(source: EvalSource, limit: int = 0, perturb: bool = False) -> Iterator[dict]:
            """This rank's batches of `source`: the detector's outputs (on CPU) and the sample index."""
            loader = source.loader(transform, batch_size=cfg.batch_size, rank=run.rank, world_size=run.world_size,
                                   num_workers=cfg.num_workers)
            seen = 0
            for images, labels, index in loader:
                run.progress(f"evaluate {source.name}")
                if limit and seen >= limit:
                    return
                seen += len(index)
                images, labels = images.to(run.device), labels.to(run.device)
                yield {"outputs": detector.forward(images, labels, perturb=perturb, autocast=run.autocast),
                       "index": index}

        # -- fit on the ID training split: streaming, rank 0 accumulates ----------------------------
        if fit_set is not None:
            limit = -(-cfg.fit_max_samples // run.world_size) if cfg.fit_max_samples else 0
            for fit_pass in range(detector.fit_passes):
                for chunk in _lockstep(run, outputs_of(fit_set, limit), fit_set, cfg):
                    detector.fit_batch(fit_pass, chunk)
                if run.is_main:
                    run.progress(f"fit pass {fit_pass + 1}")
                    detector.fit_end(fit_pass)
            run.print(f"fitted {', '.join(detector.fitting)} on {fit_set.name}")
            detector.load_fitted(run.gather_objects(detector.fitted_state() if run.is_main else None)[0])

        # -- one pass per evaluation set; every sample once, in order, on rank 0 ------------------
        sets: dict[str, dict] = {}
        damaged: dict[str, int] = {}
        for source in [id_set, *ood_sets]:
            local = list(outputs_of(source, perturb=True))
            gathered = run.gather_objects({"parts": local, "problems": source.problems()})
            parts = [part for rank in gathered for part in rank["parts"]]
            damaged[source.name] = damage_of(source, [rank["problems"] for rank in gathered], cfg.max_bad_fraction)
            order = torch.cat([part["index"] for part in parts]).argsort()
            sets[source.name] = take_outputs(concat_outputs([part["outputs"] for part in parts]), order)

        summary: dict[str, Any] = {}
        if run.is_main:
            accuracy = detector.accuracy(sets[id_set.name])
            by_set = {set_name: detector.scores(outputs) for set_name, outputs in sets.items()}
            scores = {name: {set_name: by_set[set_name][name] for set_name in sets} for name in detector.names}
            base_rate = "all" if cfg.base_rate == "all" else float(cfg.base_rate)
            rows = []
            for name in detector.names:
                for ood in ood_sets:
                    metrics = ood_metrics(scores[name][id_set.name], scores[name][ood.name], base_rate=base_rate,
                                          num_draws=cfg.num_draws, seed=cfg.runtime.seed)
                    rows.append({"scorer": name, "ood": ood.name, "id": id_set.name,
                                 "id_accuracy": float("nan") if accuracy is None else accuracy, **metrics})
                    run.log({f"{ood.name}/{name}/{k}": float(v) for k, v in metrics.items()}, 0)
            per_sample = {f"{name}/{set_name}": values for name, by_set in scores.items()
                          for set_name, values in by_set.items()}
            for path in [*write_tables(rows, run.run_dir), files.write_npz(run.run_dir / "scores.npz", per_sample)]:
                run.save_artifact(path)
            run.log_table(rows, "results_table.json")  # the UI's table view, comparable across evaluate runs
            if cfg.plots:
                for path in write_plots(scores, id_set.name, run.run_dir / "plots"):
                    run.save_artifact(path, "plots")
            run.print(markdown_table(rows))
            summary = {"id_accuracy": float("nan") if accuracy is None else accuracy, "rows": len(rows),
                       "num_id": len(next(iter(sets[id_set.name].values()))),
                       "num_ood": {s.name: s.num_samples for s in ood_sets},
                       **{f"data/damaged_samples/{name}": count for name, count in damaged.items()}}
            if any(damaged.values()):
                run.print("skipped damaged images: " + ", ".join(f"{name} {count}" for name, count in damaged.items()
                                                                 if count))
        run.finish(summary, step=0, headline=headline(summary, rows if run.is_main else []))
        run.print_summary({"id_accuracy": summary.get("id_accuracy", float("nan")),
                           "table": str(run.run_dir / "results.md")})


def headline(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """ID accuracy and, per scorer, the mean AUROC and FPR95 over the OOD sets: the run's description ends so."""
    by_scorer: dict[str, list[dict]] = {}
    for row in rows:
        by_scorer.setdefault(row["scorer"], []).append(row)
    parts = [f"ID accuracy {summary.get('id_accuracy', float('nan')):.4f}"] if summary else []
    parts += [f"{name}: mean AUROC {sum(r['auroc'] for r in rs) / len(rs):.4f}, mean FPR95 "
              f"{sum(r['fpr95'] for r in rs) / len(rs):.4f} over {len(rs)} OOD sets" for name, rs in by_scorer.items()]
    return "; ".join(parts)


def damage_of(source: EvalSource, per_rank: list[dict[str, int]], max_bad_fraction: float) -> int:
    """The damaged images every rank skipped in `source` (a DataError past `max_bad_fraction`, or when
    nothing of it could be read)."""
    counts = {key: sum(rank[key] for rank in per_rank) for key in per_rank[0]}
    check_damage(counts, max_bad_fraction, source.spec)
    if counts["served_samples"] == 0:
        raise DataError(f"evaluation set {source.spec!r}: none of its {source.num_samples} images could be read")
    return counts["corrupt_samples"] + counts["unreadable_samples"]


def _lockstep(run: Any, local: Iterator[dict], source: EvalSource, cfg: EvaluateConfig) -> Iterator[dict]:
    """The fit stream on rank 0, one batch_size chunk at a time, in sample-index order.

    Each step gathers one batch from every rank (a rank with none left sends nothing), so rank
    0 never holds the whole split; chunks are cut by sample index, so a streaming fit sees the
    same sequence whatever the world size (exactly so with data loader workers off)."""
    pending: list[tuple[torch.Tensor, dict]] = []
    for _ in range(source.most_batches(cfg.batch_size, run.world_size, cfg.num_workers)):
        parts = [p for p in run.gather_objects(next(local, None)) if p is not None]
        if not parts:
            break
        if run.is_main:
            pending += [(p["index"], p["outputs"]) for p in parts]
            while sum(len(index) for index, _ in pending) >= cfg.batch_size:
                chunk, pending = _cut(pending, cfg.batch_size)
                yield chunk
    if run.is_main and pending:
        yield _cut(pending, sum(len(index) for index, _ in pending))[0]


def _cut(pending: list[tuple[torch.Tensor, dict]], size: int) -> tuple[dict, list[tuple[torch.Tensor, dict]]]:
    """The `size` lowest-index samples of `pending` as one batch of outputs, and the rest."""
    index = torch.cat([i for i, _ in pending])
    order = index.argsort()
    merged = take_outputs(concat_outputs([outputs for _, outputs in pending]), order)
    head, rest = take_outputs(merged, slice(0, size)), take_outputs(merged, slice(size, None))
    left = index[order][size:]
    return head, ([(left, rest)] if len(left) else [])


if __name__ == "__main__":
    entrypoint(main)
