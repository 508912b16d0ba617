"""Stage: outlier-exposure fine-tuning (mixupoe.txt Section 4, App. D.1/D.3).

Starts from a finished Standard classifier (train_classifier) -- or from scratch, Section
5.4 -- and trains on ID batches plus outlier batches streamed with replacement from a shard
pool (WebVision in the paper, the benchmark's classes excluded), with one objective:

    oe         CE(ID) + beta * CE(outliers, uniform)                                    Eq. 1
    energy_oe  CE(ID) + weight * energy margins m_in / m_out                           Liu et al.
    mixup_oe   CE(ID) + beta_id_ood * CE(mixup(ID, outlier), lam y + (1 - lam) U)      Eq. 3
               (mixup_oe.terms=[id,id_id,id_ood,ood] gives the four terms of Eq. 2)

ID images, mixed images and outliers go through one forward pass (BatchNorm sees them
together). Paper settings: `--preset bird|dog|flower|car|aircraft` (10 epochs, cosine from
1e-3, ID batch 32 + outlier batch 32), `--preset inet_a|inet_b` for the coarse setting.

    accelerate launch --multi_gpu --num_processes 8 recipes/finetune_oe.py --preset bird method=mixup_oe \
        standard=runs/train_classifier/bird data.root=/data/shards/cub outliers.root=/data/shards/webvision
    sbatch slurm/finetune_oe.sh --preset bird method=oe standard=... data.root=... outliers.root=...

Output (run_dir): model/ (weights + model.json with the method and its OOD score), checkpoints/,
config.json, summary.json -- and the MLflow run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from timm.utils import ModelEmaV3

from disttrain import config
from disttrain.config import ConfigError, FinetuneOEConfig
from disttrain.data.class_filter import stream_classes
from disttrain.data.shards import MANIFEST, ShardSplit, seed_of
from disttrain.data.sources import open_source
from disttrain.data.stream import OutlierStream, ShardReader
from disttrain.data.transforms import train_transform
from disttrain.methods.outlier_exposure import build_objective
from disttrain.models.cards import ModelCard, classifier_card
from disttrain.models.classifier import build_classifier, check_classifier
from disttrain.runtime import Phase, TrainLoop, entrypoint, start_run
from disttrain.runtime.classify import ClassifierEval
from disttrain.runtime.loop import total_steps
from disttrain.runtime.optim import build_optimizer, build_schedule
from disttrain.runtime.saved import check_card_fits_data, load_saved_classifier, saved_model_card


def standard_card(cfg: FinetuneOEConfig, train_split: ShardSplit) -> ModelCard | None:
    """The Standard classifier's model card, checked against the ID data; None from scratch."""
    if cfg.from_scratch:
        return None
    try:
        card = saved_model_card(cfg.standard)
    except ConfigError as err:
        raise ConfigError(f"standard={cfg.standard!r}: {err}") from None
    if card.stage != "train_classifier":
        raise ConfigError(f"standard={cfg.standard!r} holds a {card.stage!r} model, not a Standard one: point "
                          f"at the run dir of a finished train_classifier stage")
    check_card_fits_data(card, f"standard={cfg.standard!r}", train_split.classes, cfg.data, train_split.root,
                         "fine-tune on the data the Standard model learned")
    return card


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(FinetuneOEConfig, argv)
    if cfg.hparams_from:  # a sweep's chosen values, under what the command line sets
        cfg = config.parse_cli(FinetuneOEConfig, [*config.sweep_choice(cfg.hparams_from), *argv])
    data, out = cfg.data, cfg.outliers
    # -- every input checked before any compute ------------------------------------------------
    train_split = ShardSplit.open(Path(data.root) / data.train_split, data.verify_checksums)
    test_set = open_source(str(Path(data.root) / data.eval_split), data.image_size)
    card = standard_card(cfg, train_split)
    if card is None:
        check_classifier(image_size=data.image_size, **cfg.model.arguments())
    pool = ShardSplit.open(out.root, data.verify_checksums)
    keep, exclusions = stream_classes(pool.classes, pool.manifest.get("class_ids", []),
                                      pool.manifest.get("class_counts", []), benchmark=out.exclude_benchmark,
                                      exclude_ids=out.exclude_ids, wordnet_dir=out.wordnet)
    method_params = dataclasses.asdict(getattr(cfg, cfg.method))
    objective = build_objective(cfg.method, train_split.num_classes, **method_params)

    with start_run(cfg, model_card=card) as run:  # its params: the model it fine-tunes
        # -- build ---------------------------------------------------------------------------
        if card is None:
            model = build_classifier(num_outputs=train_split.num_classes, image_size=data.image_size,
                                     **cfg.model.arguments())
        else:
            model, _ = load_saved_classifier(cfg.standard)
            model = model.train().requires_grad_(True)
        model = run.place(model)
        ema = ModelEmaV3(model, decay=cfg.runtime.ema_decay) if cfg.runtime.ema_decay else None
        transform = train_transform(data.image_size, data.resize_size, data.augment, data.hflip)
        reader = ShardReader(train_split, transform, batch_size=cfg.batch.micro_size, rank=run.rank,
                             world_size=run.world_size, num_workers=data.num_workers, seed=cfg.runtime.seed,
                             max_bad_fraction=data.max_bad_fraction)
        outlier_micro = cfg.batch.companion_micro_size(out.batch_size, "outliers.batch_size", run.world_size)
        outliers = OutlierStream(pool, transform, batch_size=outlier_micro,
                                 batches_per_epoch=reader.batches_per_epoch, rank=run.rank,
                                 world_size=run.world_size, num_workers=out.num_workers, seed=cfg.runtime.seed,
                                 keep_labels=keep, max_bad_fraction=data.max_bad_fraction)
        steps = total_steps(reader.batches_per_epoch, run.grad_accum_steps, cfg.train.num_epochs,
                            cfg.train.max_steps)
        optimizer = build_optimizer(cfg.optim, cfg.batch, model)
        scheduler = build_schedule(cfg.optim, optimizer, steps)

        run.log_data("train", train_split.root / MANIFEST)
        run.log_data("outliers", pool.root / MANIFEST)
        if exclusions:
            run.tracker.log_params({"data.outliers.stream_kept_classes": exclusions["kept_classes"],
                                    "data.outliers.stream_kept_samples": exclusions["kept_samples"]})
            run.print(f"outlier stream: {exclusions['kept_classes']} of {pool.num_classes} classes kept "
                      f"({len(exclusions['excluded'])} excluded for {out.exclude_benchmark or 'exclude_ids'}"
                      f"{'' if exclusions['hierarchy'] else ', keyword fallback: no outliers.wordnet'})")

        # -- prepare -------------------------------------------------------------------------
        model, optimizer = run.prepare(model, optimizer)
        tester = ClassifierEval(run, test_set, image_size=data.image_size, resize_size=data.resize_size,
                                batch_size=cfg.batch.micro_size, num_workers=data.num_workers,
                                channels_last=cfg.runtime.channels_last, max_bad_fraction=data.max_bad_fraction)

        def batches(epoch: int, skip: int) -> Iterator[tuple]:
            """ID and outlier micro-batches side by side, with the seed of the batch's mixing draws."""
            pairs = zip(reader.loader(epoch, skip), outliers.loader(epoch, skip))
            for index, ((images, labels), (outlier_images, _)) in enumerate(pairs, start=skip):
                yield images, labels, outlier_images, seed_of(cfg.runtime.seed, "mix", epoch, run.rank, index)

        def train_step(batch: tuple) -> dict[str, torch.Tensor]:
            images, labels, outlier_images, seed = batch
            return objective(model, tester.images(images), tester.labels(labels), tester.images(outlier_images),
                             np.random.default_rng(seed))

        def data_problems() -> dict[str, int]:
            return {**reader.problems(), **{f"outliers_{k}": v for k, v in outliers.problems().items()}}

        # -- loop ----------------------------------------------------------------------------
        loop = TrainLoop(run, Phase("train", model, optimizer, train_step, scheduler=scheduler), ema=ema,
                         eval_fn=lambda: tester.metrics(model, ema), data_counters=data_problems,
                         data_names={"": str(train_split.root), "outliers_": str(pool.root)})
        result = loop.fit(batches, batches_per_epoch=reader.batches_per_epoch, num_epochs=cfg.train.num_epochs,
                          max_steps=cfg.train.max_steps)

        # -- save ----------------------------------------------------------------------------
        base = card or classifier_card(cfg.model.arguments(), train_split.num_classes, train_split.classes,
                                       data.image_size, data.resize_size)
        details = {"init": "scratch" if card is None else "finetune",
                   "standard": str(Path(cfg.standard).resolve()) if card is not None else "",
                   "hyperparameters": method_params, "outliers": str(Path(out.root).resolve())}
        model_dir = run.save_model(model, dataclasses.replace(base, method=cfg.method, score=objective.score,
                                                              details=details), ema=ema)
        summary = loop.summary(result, method=cfg.method, model_dir=str(model_dir), **reader.manifest_counts(),
                               **outliers.manifest_counts("outliers_"))
        run.finish(summary, step=result["step"])
        run.print_summary(summary)


if __name__ == "__main__":
    entrypoint(main)
