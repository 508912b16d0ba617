"""Stage: train an image classifier (the "Standard" model of mixupoe.txt App. D.1).

Cross-entropy on the ID training split, SGD with a cosine schedule, top-1 accuracy on
the test split; any timm model, ImageNet-initialised from a local weights file.

    accelerate launch --multi_gpu --num_processes 8 recipes/train_classifier.py --preset bird \
        data.root=/data/shards/cub model.pretrained_file=/weights/resnet50.a1_in1k.safetensors
    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml recipes/train_classifier.py --preset bird ...
    sbatch --nodes 2 slurm/train_classifier.sh --preset bird data.root=... model.pretrained_file=...

Output (run_dir): model/ (weights + model.json for the next stage), checkpoints/,
config.json, summary.json, tracking/ -- and the MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from disttrain import config
from disttrain.config import TrainClassifierConfig
from disttrain.data.shards import MANIFEST, ShardSplit
from disttrain.data.stream import ShardReader
from disttrain.data.sources import open_source
from disttrain.data.transforms import train_transform
from disttrain.models.cards import classifier_card
from disttrain.models.classifier import build_classifier, check_classifier
from disttrain.runtime import Phase, TrainLoop, entrypoint, start_run
from disttrain.runtime.loop import total_steps
from disttrain.runtime.classify import ClassifierEval
from disttrain.runtime.optim import build_optimizer, build_schedule


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(TrainClassifierConfig, argv)
    data = cfg.data
    train_split = ShardSplit.open(Path(data.root) / data.train_split, data.verify_checksums)  # errors before compute
    test_set = open_source(str(Path(data.root) / data.eval_split), data.image_size)
    check_classifier(image_size=data.image_size, **cfg.model.arguments())

    with start_run(cfg) as run:
        # -- build ---------------------------------------------------------------------------
        model = build_classifier(num_outputs=train_split.num_classes, image_size=data.image_size,
                                 **cfg.model.arguments())
        model = run.place(model)
        ema = ModelEmaV3(model, decay=cfg.runtime.ema_decay) if cfg.runtime.ema_decay else None
        transform = train_transform(data.image_size, data.resize_size, data.augment, data.hflip)
        reader = ShardReader(train_split, transform, batch_size=cfg.batch.micro_size, rank=run.rank,
                             world_size=run.world_size, num_workers=data.num_workers, seed=cfg.runtime.seed,
                             max_bad_fraction=data.max_bad_fraction)
        steps = total_steps(reader.batches_per_epoch, run.grad_accum_steps, cfg.train.num_epochs,
                            cfg.train.max_steps)
        optimizer = build_optimizer(cfg.optim, cfg.batch, model)
        scheduler = build_schedule(cfg.optim, optimizer, steps)

        run.log_data("train", train_split.root / MANIFEST)

        # -- prepare -------------------------------------------------------------------------
        model, optimizer = run.prepare(model, optimizer)
        tester = ClassifierEval(run, test_set, image_size=data.image_size, resize_size=data.resize_size,
                                batch_size=cfg.batch.micro_size, num_workers=data.num_workers,
                                channels_last=cfg.runtime.channels_last, max_bad_fraction=data.max_bad_fraction)

        def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            images, labels = tester.images(batch[0]), tester.labels(batch[1])
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            return {"loss": loss, "acc1": (logits.argmax(1) == labels).float().mean()}

        # -- loop ----------------------------------------------------------------------------
        loop = TrainLoop(run, Phase("train", model, optimizer, train_step, scheduler=scheduler), ema=ema,
                         eval_fn=lambda: tester.metrics(model, ema), data_counters=reader.problems,
                         data_names={"": str(train_split.root)})
        result = loop.fit(reader.loader, batches_per_epoch=reader.batches_per_epoch,
                          num_epochs=cfg.train.num_epochs, max_steps=cfg.train.max_steps)

        # -- save ----------------------------------------------------------------------------
        card = classifier_card(cfg.model.arguments(), train_split.num_classes, train_split.classes, data.image_size,
                               data.resize_size)
        model_dir = run.save_model(model, card, ema=ema)
        summary = loop.summary(result, model_dir=str(model_dir), **reader.manifest_counts())
        run.finish(summary, step=result["step"])
        run.print_summary(summary)

if __name__ == "__main__":
    entrypoint(main)
