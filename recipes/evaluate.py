"""Stage: evaluate OOD detection of a trained classifier with post-hoc scorers.

One pass of the (frozen) classifier over the ID test set and every OOD set, on all ranks;
every requested scorer (fitted first on the ID *training* split when it needs ID
statistics) turns the features into OOD scores; AUROC, AUPR-In, AUPR-Out and FPR@95TPR
at the ID:OOD base rate (mean +- std over seeded draws) and ID accuracy go into one table.

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

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from disttrain import config, files
from disttrain.config import ConfigError, EvaluateConfig
from disttrain.data.shards import DataError
from disttrain.data.sources import EvalSource, interpolated_source, open_source
from disttrain.data.stream import check_damage
from disttrain.data.transforms import eval_transform
from disttrain.ood import scorers as scorer_registry
from disttrain.ood.features import FeatureExtractor, concat, take, to_cpu
from disttrain.ood.metrics import ood_metrics
from disttrain.ood.report import markdown_table, write_plots, write_tables
from disttrain.runtime import entrypoint, start_run
from disttrain.runtime.saved import build_saved_architecture, saved_model_card


PLAIN = "plain"  # the extractor key of scorers that need no block features


def classifier_card(run_dir: str) -> dict[str, Any]:
    try:
        return saved_model_card(run_dir)
    except ConfigError as err:
        raise ConfigError(f"model={run_dir!r}: {err}") from None


def parse_scorer_args(items: list[str], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """`odin.temperature=1000` -> {"odin": {"temperature": 1000.0}}; values are int, float, bool or str."""
    out: dict[str, dict[str, Any]] = {name: {} for name in wanted}
    for item in items:
        key, _, raw = item.partition("=")
        name, _, param = key.partition(".")
        if not raw or not param:
            raise ConfigError(f"scorer_args entry {item!r}: expected <scorer>.<param>=<value>")
        if name not in out:
            raise ConfigError(f"scorer_args entry {item!r} is for {name!r}, which is not in scorers={wanted}")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[name][param] = value
    return out


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(EvaluateConfig, argv)
    # -- every input checked before the long pass --------------------------------------------
    card = classifier_card(cfg.model)
    if card.get("score") and card["score"] not in cfg.scorers:  # the score a fine-tuning method is evaluated with
        cfg.scorers.append(card["score"])
    args = parse_scorer_args(cfg.scorer_args, cfg.scorers)
    try:
        scorers = {name: scorer_registry.get(name, **args[name]) for name in cfg.scorers}
    except ValueError as err:  # an unknown name or hyper-parameter: the message lists the valid ones
        raise ConfigError(f"scorers / scorer_args: {err}") from None
    image_size, resize = card["image_size"], card["resize_size"]
    id_set = open_source(cfg.id, image_size)
    ood_sets = [open_source(spec, image_size) for spec in cfg.ood]
    if cfg.interpolate:
        mixed_in = ood_sets[cfg.ood.index(cfg.interpolate_with) if cfg.interpolate_with else -1]
        ood_sets += [interpolated_source(id_set, mixed_in, lam, cfg.interpolate_max) for lam in cfg.interpolate]
    names = [id_set.name] + [s.name for s in ood_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation sets need distinct names, got {names}: rename a folder or drop a duplicate")
    fitting = [name for name, s in scorers.items() if s.needs_fit]
    if fitting and not cfg.fit:
        raise ConfigError(f"scorers {fitting} fit ID statistics: pass fit=<the ID training split> "
                          f"(never the test set), or drop them from scorers")
    if fitting and Path(cfg.fit).resolve() == Path(cfg.id).resolve():
        raise ConfigError(f"fit={cfg.fit!r} is the ID test set: scorers must fit on the ID training split")
    fit_set = open_source(cfg.fit, image_size) if fitting else None
    num_id = card["num_classes"]
    extra = [name for name, s in scorers.items() if s.reads_extra_outputs]
    if extra and card.get("num_outputs", num_id) <= num_id:
        raise ConfigError(f"scorers {extra} read an extra OOD output, which {cfg.model} has not (it outputs its "
                          f"{num_id} classes only): use them on a finetune_head method=cmg_softmax model")
    if cfg.use_ema and not card.get("ema"):
        raise ConfigError(f"use_ema=true but {cfg.model} saved no EMA weights (its runtime.ema_decay was 0)")

    with start_run(cfg) as run:
        # -- the frozen classifier: never prepared, the same weights on every rank ---------------
        model = build_saved_architecture(card)
        weights = Path(cfg.model) / "model" / ("ema.safetensors" if cfg.use_ema else "model.safetensors")
        model.load_state_dict(load_file(weights))
        model = model.to(run.device).eval().requires_grad_(False)
        head = model.get_classifier()
        for scorer in scorers.values():
            if scorer.needs_classifier:  # ViM, ReAct recompute logits from the penultimate features
                scorer.set_classifier(head.weight[:num_id].detach().cpu(), head.bias[:num_id].detach().cpu())
        # one extractor per scorer that needs block features; the others share the plain one
        extractors = {name: FeatureExtractor(model, s.reduce_block) for name, s in scorers.items() if s.needs_blocks}
        extractors[PLAIN] = FeatureExtractor(model)
        key_of = {name: name if name in extractors else PLAIN for name in scorers}
        transform = eval_transform(image_size, resize)

        def features_of(source: EvalSource, limit: int = 0, perturb: bool = False) -> Iterator[dict]:
            """This rank's batches of `source` as {extractor key: Features (on CPU)} plus the sample index;
            with `perturb`, scorers with input preprocessing get features of their perturbed inputs."""
            loader = source.loader(transform, batch_size=cfg.batch_size, rank=run.rank, world_size=run.world_size,
                                   num_workers=cfg.num_workers)
            seen = 0
            for images, labels, index in loader:
                run.progress(f"evaluate {source.name}")
                if limit and seen >= limit:
                    return
                seen += len(index)
                images, labels = images.to(run.device), labels.to(run.device)
                with torch.no_grad(), run.autocast():
                    out = {key: to_cpu(ex(images, labels)) for key, ex in extractors.items()}
                if perturb:
                    for name, scorer in scorers.items():
                        if scorer.needs_input_grad:
                            ex = extractors[key_of[name]]
                            moved = scorer.perturb(ex, images)
                            with torch.no_grad():
                                out[("perturbed", name)] = to_cpu(ex(moved, labels))
                yield {"features": out, "index": index}

        # -- fit on the ID training split: streaming, rank 0 accumulates ----------------------------
        if fit_set is not None:
            limit = -(-cfg.fit_max_samples // run.world_size) if cfg.fit_max_samples else 0
            for fit_pass in range(max(scorers[n].fit_passes for n in fitting)):
                active = [n for n in fitting if scorers[n].fit_passes > fit_pass]
                for chunk in _lockstep(run, features_of(fit_set, limit), fit_set, cfg):
                    for name in active:
                        scorers[name].fit_batch(chunk[key_of[name]])
                if run.is_main:
                    for name in active:
                        run.progress(f"fit {name}")
                        scorers[name].fit_end()
            run.print(f"fitted {', '.join(fitting)} on {fit_set.name}")
            # ranks other than 0 perturb inputs with fitted scorers too: share the fitted state
            if any(scorers[n].needs_input_grad for n in fitting):
                fitted = run.gather_objects(scorers if run.is_main else None)[0]
                scorers.update(fitted)

        # -- one pass per evaluation set; every sample once, in order, on rank 0 ------------------
        sets: dict[str, dict] = {}
        damaged: dict[str, int] = {}
        for source in [id_set, *ood_sets]:
            local = list(features_of(source, perturb=True))
            gathered = run.gather_objects({"parts": local, "problems": source.problems()})
            parts = [part for rank in gathered for part in rank["parts"]]
            damaged[source.name] = damage_of(source, [rank["problems"] for rank in gathered], cfg.max_bad_fraction)
            order = torch.cat([part["index"] for part in parts]).argsort()
            sets[source.name] = {key: take(concat([part["features"][key] for part in parts]), order)
                                 for key in parts[0]["features"]}

        summary: dict[str, Any] = {}
        if run.is_main:
            id_plain = sets[id_set.name][PLAIN]
            accuracy = float((id_plain.logits[:, :num_id].argmax(1) == id_plain.labels).float().mean())

            def scored(name: str, by_key: dict) -> np.ndarray:
                run.progress(f"score {name}")
                key = ("perturbed", name) if scorers[name].needs_input_grad else key_of[name]
                features = by_key[key]
                if not scorers[name].reads_extra_outputs:  # the ID classes' logits (all of them but CMG-s's)
                    features = dataclasses.replace(features, logits=features.logits[:, :num_id])
                return scorers[name].score(features).double().numpy()

            scores = {name: {set_name: scored(name, by_key) for set_name, by_key in sets.items()} for name in scorers}
            base_rate = "all" if cfg.base_rate == "all" else float(cfg.base_rate)
            rows = []
            for name in scorers:
                for ood in ood_sets:
                    metrics = ood_metrics(scores[name][id_set.name], scores[name][ood.name], base_rate=base_rate,
                                          num_draws=cfg.num_draws, seed=cfg.runtime.seed)
                    rows.append({"scorer": name, "ood": ood.name, "id": id_set.name, "id_accuracy": accuracy,
                                 **metrics})
                    run.log({f"{ood.name}/{name}/{k}": float(v) for k, v in metrics.items()}, 0)
            per_sample = {f"{name}/{set_name}": values for name, by_set in scores.items()
                          for set_name, values in by_set.items()}
            for path in [*write_tables(rows, run.run_dir), files.write_npz(run.run_dir / "scores.npz", per_sample)]:
                run.save_artifact(path)
            if cfg.plots:
                for path in write_plots(scores, id_set.name, run.run_dir / "plots"):
                    run.save_artifact(path, "plots")
            run.print(markdown_table(rows))
            summary = {"id_accuracy": accuracy, "rows": len(rows), "num_id": len(id_plain),
                       "num_ood": {s.name: s.num_samples for s in ood_sets},
                       **{f"data/damaged_samples/{name}": count for name, count in damaged.items()}}
            if any(damaged.values()):
                run.print("skipped damaged images: " + ", ".join(f"{name} {count}" for name, count in damaged.items()
                                                                 if count))
        run.finish(summary, step=0)
        run.print_summary({"id_accuracy": summary.get("id_accuracy", float("nan")),
                           "table": str(run.run_dir / "results.md")})


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
            pending += [(p["index"], p["features"]) for p in parts]
            while sum(len(index) for index, _ in pending) >= cfg.batch_size:
                chunk, pending = _cut(pending, cfg.batch_size)
                yield chunk
    if run.is_main and pending:
        yield _cut(pending, sum(len(index) for index, _ in pending))[0]


def _cut(pending: list[tuple[torch.Tensor, dict]], size: int) -> tuple[dict, list[tuple[torch.Tensor, dict]]]:
    """The `size` lowest-index samples of `pending` as {key: Features}, and the rest."""
    index = torch.cat([i for i, _ in pending])
    order = index.argsort()
    keys = pending[0][1].keys()
    merged = {key: take(concat([f[key] for _, f in pending]), order) for key in keys}
    head = {key: take(f, slice(0, size)) for key, f in merged.items()}
    rest = {key: take(f, slice(size, None)) for key, f in merged.items()}
    left = index[order][size:]
    return head, ([(left, rest)] if len(left) else [])


if __name__ == "__main__":
    entrypoint(main)
