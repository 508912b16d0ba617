"""Stage: CMG stage 2 -- fine-tune a trained classifier's last layer on ID + pseudo-OOD data.

cmg.txt Section 3.3: the feature extractor h of a finished classifier stays frozen (eval mode,
never handed to `prepare`); only the final linear layer f trains, on batches of 128 ID + 128
pseudo-OOD images (synthesize's shards, streamed with replacement), Adam lr 1e-4, 10 epochs.

    cmg_softmax  an (N+1)-th output for the pseudo-OOD data, cross-entropy over N+1 classes;
                 OOD score: its softmax probability (scorer `ood_class`)
    cmg_energy   CE(ID) + lambda * Eq. 5, the margins m_ind / m_ood set before fine-tuning so that
                 80 % of the ID and of the pseudo-OOD training data get a non-zero loss;
                 OOD score: the energy of Eq. 6 (scorer `energy`)

The ablations of Section 4.5 are options: strategy=unfrozen (the whole network fine-tunes),
strategy=direct (one stage: a fresh model.* trained on ID + pseudo-OOD data), and
pseudo_ood.use=false (cmg_energy on ID data alone). Any classifier stage's run dir works as
`classifier` -- train_classifier, or a finetune_oe model (cmg.txt Table 2).

    accelerate launch --multi_gpu --num_processes 8 recipes/finetune_head.py --preset cifar10 method=cmg_energy \
        classifier=runs/train_classifier/cifar10 pseudo=runs/synthesize/cifar10 data.root=/data/shards/cifar10-p1
    sbatch slurm/finetune_head.sh --preset cifar10 method=cmg_softmax classifier=... pseudo=... data.root=...

Output (run_dir): model/ (the whole classifier, model.json with the method and its OOD score),
margins.json (cmg_energy), checkpoints/, summary.json -- and the MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from disttrain import config, files
from disttrain.config import ConfigError, FinetuneHeadConfig
from disttrain.data.shards import MANIFEST, ShardSplit
from disttrain.data.sources import open_source
from disttrain.data.stream import OutlierStream, ShardReader
from disttrain.data.transforms import eval_transform, train_transform
from disttrain.methods.cmg import CMGEnergy, CMGSoftmax, energy_margins
from disttrain.methods.outlier_exposure import energy
from disttrain.models.cards import ModelCard, classifier_card
from disttrain.models.classifier import (KnownClassLogits, attach_head, build_classifier, check_classifier, split_head,
                                         widen_head)
from disttrain.runtime import Phase, TrainLoop, entrypoint, read_status, start_run
from disttrain.runtime.classify import ClassifierEval
from disttrain.runtime.loop import total_steps
from disttrain.runtime.optim import build_optimizer, build_schedule
from disttrain.runtime.saved import check_card_fits_data, load_saved_classifier, saved_model_card

PSEUDO_DIR = "pseudo_ood"  # where synthesize writes its split
INIT = {"frozen": "finetune", "unfrozen": "unfrozen", "direct": "direct"}  # the report's row suffix


def stage1_card(cfg: FinetuneHeadConfig, train_split: ShardSplit) -> ModelCard | None:
    """The stage-1 classifier's card, checked against the ID data; None for strategy=direct."""
    if cfg.strategy == "direct":
        check_classifier(image_size=cfg.data.image_size, **cfg.model.arguments())
        return None
    try:
        card = saved_model_card(cfg.classifier)
    except ConfigError as err:
        raise ConfigError(f"classifier={cfg.classifier!r}: {err}") from None
    if card.architecture != "timm_classifier":
        raise ConfigError(f"classifier={cfg.classifier!r} is a {card.architecture} (from {card.stage}), not a "
                          f"classifier")
    if card.num_outputs != card.num_classes:
        raise ConfigError(f"classifier={cfg.classifier!r} already has an OOD output (a cmg_softmax model): "
                          f"fine-tune its stage-1 classifier instead")
    check_card_fits_data(card, f"classifier={cfg.classifier!r}", train_split.classes, cfg.data, train_split.root,
                         "fine-tune on the data the classifier learned")
    return card


def pseudo_split(cfg: FinetuneHeadConfig) -> ShardSplit | None:
    """The pseudo-OOD shard split: a finished synthesize run's, or a split given directly."""
    if not cfg.pseudo_ood.use:
        return None
    root = Path(cfg.pseudo)
    if (root / "run.json").is_file():  # a stage's run dir
        state = read_status(root).get("state")
        if state != "finished" or not (root / PSEUDO_DIR / MANIFEST).is_file():
            raise ConfigError(f"pseudo={cfg.pseudo!r} is a run that has not finished writing pseudo-OOD shards "
                              f"(status: {state}): finish recipes/synthesize.py first")
        root = root / PSEUDO_DIR
    split = ShardSplit.open(root, cfg.data.verify_checksums)
    if split.num_samples == 0:
        raise ConfigError(f"pseudo={cfg.pseudo!r} holds no pseudo-OOD images: synthesize some (cmg.ratio > 0)")
    return split


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(FinetuneHeadConfig, argv)
    data = cfg.data
    # -- every input checked before any compute ------------------------------------------------
    train_split = ShardSplit.open(Path(data.root) / data.train_split, data.verify_checksums)
    test_set = open_source(str(Path(data.root) / data.eval_split), data.image_size)
    card = stage1_card(cfg, train_split)
    pseudo = pseudo_split(cfg)
    num_id = train_split.num_classes
    extra = CMGSoftmax.extra_outputs if cfg.method == "cmg_softmax" else 0

    with start_run(cfg, model_card=card) as run:  # its params: the model it fine-tunes
        if cfg.strategy == "frozen" and run.params_sharded:
            raise ConfigError("strategy=frozen trains one linear layer: run it with DDP or DeepSpeed ZeRO-1/2, "
                              "not FSDP / ZeRO-3")
        # -- build: h (the extractor) and f (the last layer) ------------------------------------
        if card is None:
            net = build_classifier(num_outputs=num_id, image_size=data.image_size, **cfg.model.arguments())
        else:
            net, _ = load_saved_classifier(cfg.classifier)
        extractor, head = split_head(net)
        head = widen_head(head, extra).requires_grad_(True)
        frozen = cfg.strategy == "frozen"
        if frozen:
            extractor = run.place(extractor.eval().requires_grad_(False))
            trainable = run.place(head)
        else:
            trainable = run.place(attach_head(extractor, head).train().requires_grad_(True))

        def logits_of(images: torch.Tensor) -> torch.Tensor:
            if frozen:
                with torch.no_grad():
                    features = extractor(images)
                return trainable(features)
            return trainable(images)

        # -- cmg_energy's margins, from the energies before fine-tuning ---------------------------
        tester = ClassifierEval(run, test_set, image_size=data.image_size, resize_size=data.resize_size,
                                batch_size=cfg.batch.micro_size, num_workers=data.num_workers,
                                channels_last=cfg.runtime.channels_last, max_bad_fraction=data.max_bad_fraction)
        if cfg.method == "cmg_energy":
            trainable.eval()  # the model as it is: BatchNorm on its running statistics
            margins = energy_margin_values(cfg, run, tester, logits_of, train_split, pseudo)
            trainable.train()
            loss = CMGEnergy(margins["m_ind"], margins.get("m_ood", float("nan")), cfg.cmg_energy.weight,
                             cfg.cmg_energy.temperature)
        else:
            margins, loss = {}, CMGSoftmax()

        transform = train_transform(data.image_size, data.resize_size, data.augment, data.hflip)
        reader = ShardReader(train_split, transform, batch_size=cfg.batch.micro_size, rank=run.rank,
                             world_size=run.world_size, num_workers=data.num_workers, seed=cfg.runtime.seed,
                             max_bad_fraction=data.max_bad_fraction)
        stream = None
        if pseudo is not None:
            micro = cfg.batch.companion_micro_size(cfg.pseudo_ood.batch_size, "pseudo_ood.batch_size", run.world_size)
            stream = OutlierStream(pseudo, transform, batch_size=micro, batches_per_epoch=reader.batches_per_epoch,
                                   rank=run.rank, world_size=run.world_size, num_workers=cfg.pseudo_ood.num_workers,
                                   seed=cfg.runtime.seed, max_bad_fraction=data.max_bad_fraction)
            run.log_data("pseudo_ood", pseudo.root / MANIFEST)
        run.log_data("train", train_split.root / MANIFEST)
        steps = total_steps(reader.batches_per_epoch, run.grad_accum_steps, cfg.train.num_epochs,
                            cfg.train.max_steps)
        optimizer = build_optimizer(cfg.optim, cfg.batch, trainable)
        scheduler = build_schedule(cfg.optim, optimizer, steps)

        # -- prepare: only what trains -------------------------------------------------------------
        trainable, optimizer = run.prepare(trainable, optimizer)

        def batches(epoch: int, skip: int) -> Iterator[tuple]:
            if stream is None:
                for images, labels in reader.loader(epoch, skip):
                    yield images, labels, None
                return
            for (images, labels), (pseudo_images, _) in zip(reader.loader(epoch, skip), stream.loader(epoch, skip)):
                yield images, labels, pseudo_images

        def train_step(batch: tuple) -> dict[str, torch.Tensor]:
            images, labels, pseudo_images = batch
            inputs = tester.images(images if pseudo_images is None else torch.cat([images, pseudo_images]))
            logits = logits_of(inputs)
            n = len(images)
            return loss(logits[:n], tester.labels(labels), logits[n:] if pseudo_images is not None else None)

        def id_classifier() -> nn.Module:
            whole = nn.Sequential(extractor, run.eval_model(trainable)) if frozen else run.eval_model(trainable)
            return KnownClassLogits(whole, num_id)

        def data_problems() -> dict[str, int]:
            extra_counts = {f"pseudo_{k}": v for k, v in stream.problems().items()} if stream is not None else {}
            return {**reader.problems(), **extra_counts}

        # -- loop --------------------------------------------------------------------------------
        loop = TrainLoop(run, Phase("train", trainable, optimizer, train_step, scheduler=scheduler),
                         eval_fn=lambda: {"eval/acc1": tester.accuracy(id_classifier())}, data_counters=data_problems,
                         data_names={"": str(train_split.root), "pseudo_": str(pseudo.root) if pseudo else ""})
        result = loop.fit(batches, batches_per_epoch=reader.batches_per_epoch, num_epochs=cfg.train.num_epochs,
                          max_steps=cfg.train.max_steps)

        # -- save: the whole classifier, f back on h ---------------------------------------------
        whole = attach_head(extractor, run.accelerator.unwrap_model(trainable)) if frozen else trainable
        base = card or classifier_card(cfg.model.arguments(), num_id, train_split.classes, data.image_size,
                                       data.resize_size)
        details = {"strategy": cfg.strategy,
                   "init": INIT[cfg.strategy] + ("" if pseudo is not None else "-no-pseudo-ood"),
                   "base_method": card.method if card else "",
                   "classifier": str(Path(cfg.classifier).resolve()) if card else "",
                   "pseudo_ood": str(pseudo.root.resolve()) if pseudo is not None else "",
                   "hyperparameters": {**margins, **({"weight": cfg.cmg_energy.weight,
                                                      "temperature": cfg.cmg_energy.temperature}
                                                     if cfg.method == "cmg_energy" else {})}}
        card_out = dataclasses.replace(base, arguments={**base.arguments, "num_outputs": num_id + extra},
                                       method=cfg.method, score=loss.score, details=details)
        model_dir = run.save_model(whole, card_out)
        summary = loop.summary(result, method=cfg.method, strategy=cfg.strategy, model_dir=str(model_dir), **margins,
                               **reader.manifest_counts(), **(stream.manifest_counts("pseudo_") if stream else {}))
        run.finish(summary, step=result["step"])
        run.print_summary(summary)


def energy_margin_values(cfg: FinetuneHeadConfig, run: Any, tester: ClassifierEval, logits_of: Any,
                         train_split: ShardSplit, pseudo: ShardSplit | None) -> dict[str, float]:
    """m_ind / m_ood: fixed, or (margins=auto) the quantiles of the energies of every ID training image
    and every pseudo-OOD image under the model before fine-tuning (cmg.txt 4.3). Written to
    margins.json; a resumed run reads them back."""
    settings = cfg.cmg_energy
    path = run.run_dir / "margins.json"
    if settings.margins == "fixed":
        return {"m_ind": settings.m_ind, "m_ood": settings.m_ood}
    if run.resume_from is not None and path.is_file():
        saved = json.loads(path.read_text())
        return {"m_ind": saved["m_ind"], "m_ood": saved["m_ood"]}
    transform = eval_transform(cfg.data.image_size, cfg.data.resize_size)

    def energies_of(root: Path) -> torch.Tensor:
        source = open_source(str(root), cfg.data.image_size)
        loader = source.loader(transform, batch_size=cfg.batch.micro_size, rank=run.rank, world_size=run.world_size,
                               num_workers=cfg.data.num_workers)
        most = source.most_batches(cfg.batch.micro_size, run.world_size, cfg.data.num_workers)
        local = run.eval_batches(loader, most, lambda batch: energy(
            logits_of(tester.images(batch[0]))[:, : train_split.num_classes], settings.temperature).cpu())
        return torch.cat([e for part in run.gather_objects(local) for e in part])

    e_id = energies_of(train_split.root)
    if pseudo is None:  # the ID hinge alone (Fig. 2b): only m_ind is used
        margins = {"m_ind": float(torch.quantile(e_id.double(), 1.0 - settings.margin_fraction))}
        e_ood = e_id.new_zeros(0)
    else:
        e_ood = energies_of(pseudo.root)
        margins = dict(zip(("m_ind", "m_ood"), energy_margins(e_id, e_ood, settings.margin_fraction)))
    if run.is_main:
        files.write_json(path, {**margins, "fraction": settings.margin_fraction, "num_id": len(e_id),
                                "num_pseudo_ood": len(e_ood), "energy_id_mean": float(e_id.mean()),
                                **({"energy_pseudo_ood_mean": float(e_ood.mean())} if len(e_ood) else {})})
    run.print(f"energy margins (cmg.txt 4.3, {settings.margin_fraction:.0%} rule): "
              + ", ".join(f"{k} {v:.4f}" for k, v in margins.items())
              + f", from {len(e_id)} ID and {len(e_ood)} pseudo-OOD energies")
    return margins


if __name__ == "__main__":
    entrypoint(main)
