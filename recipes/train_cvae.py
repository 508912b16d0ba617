"""Stage: CMG's conditional VAE (cmg.txt Sections 3.1, 4.3) -- stage 1's generator.

Independent of the classifier (train_classifier): the two can run at the same time. Eq. 2 on
the ID training split -- reconstruction of x from [y_c, z] plus KL(q(z | x, c) || N(0, I)) --
with Adam (lr 1e-3, betas 0.9 / 0.999), batch 512, 200 epochs at paper scale. The test split's
loss is tracked per epoch; class-conditional samples (z ~ N(0, I)) go to MLflow as a grid.

    accelerate launch --multi_gpu --num_processes 8 recipes/train_cvae.py --preset cifar10 \
        data.root=/data/shards/cifar10-p1
    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml recipes/train_cvae.py --preset cifar10 ...
    sbatch slurm/train_cvae.sh --preset mnist data.root=/data/shards/mnist-p1

Output (run_dir): model/ (weights + model.json for synthesize), samples.png, checkpoints/,
config.json, summary.json -- and the MLflow run.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from disttrain import config, files
from disttrain.config import TrainCVAEConfig
from disttrain.data.shards import MANIFEST, ShardSplit
from disttrain.data.sources import open_source
from disttrain.data.stream import ShardReader
from disttrain.data.transforms import generator_transform
from disttrain.models.cards import ModelCard, build_network, unit_range
from disttrain.models.cvae import CVAE, cvae_loss
from disttrain.runtime import Phase, TrainLoop, entrypoint, start_run
from disttrain.runtime.loop import total_steps
from disttrain.runtime.optim import build_optimizer, build_schedule


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(TrainCVAEConfig, argv)
    data = cfg.data
    train_split = ShardSplit.open(Path(data.root) / data.train_split, data.verify_checksums)  # errors before compute
    test_set = open_source(str(Path(data.root) / data.eval_split), data.image_size) if data.eval_batches else None

    with start_run(cfg) as run:
        # -- build ---------------------------------------------------------------------------
        card = ModelCard("cvae", {"num_classes": train_split.num_classes, "image_size": data.image_size,
                                  "channels": data.channels, "variant": cfg.cvae.variant,
                                  "latent_dim": cfg.cvae.latent_dim, "embed_dim": cfg.cvae.embed_dim},
                         train_split.classes, data.image_size, data.image_size, unit_range(data.channels),
                         details={"likelihood": cfg.cvae.likelihood, "num_train_samples": train_split.num_samples,
                                  "train_data": str(train_split.root.resolve())})
        model = build_network(card)
        model = run.place(model)
        transform = generator_transform(data.image_size, data.channels, data.hflip)
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

        def to_device(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)

        def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            images, labels = to_device(*batch)
            recon, mean, logvar = model(images, labels)
            return cvae_loss(recon, images, mean, logvar, cfg.cvae.likelihood)

        def test_loss() -> dict[str, float]:
            """Eq. 2 on up to data.eval_batches test batches per rank, averaged over every rank's images."""
            if test_set is None:
                return {}
            net = run.eval_model(model)
            loader = test_set.loader(transform_eval, batch_size=cfg.batch.micro_size, rank=run.rank,
                                     world_size=run.world_size, num_workers=0)

            def batch_sums(batch: tuple) -> torch.Tensor:
                images, labels = to_device(batch[0], batch[1])
                recon, mean, logvar = net(images, labels)
                terms = cvae_loss(recon, images, mean, logvar, cfg.cvae.likelihood)
                n = len(images)
                return torch.stack([terms["loss"] * n, terms["reconstruction"] * n, terms["kl"] * n,
                                    torch.tensor(float(n), device=run.device)]).float()

            parts = run.eval_batches(itertools.islice(loader, data.eval_batches), data.eval_batches, batch_sums)
            local = torch.stack(parts).sum(0) if parts else torch.zeros(4, device=run.device)
            total = run.accelerator.reduce(local, reduction="sum")
            n = max(float(total[3]), 1.0)
            return {"eval/loss": float(total[0]) / n, "eval/reconstruction": float(total[1]) / n,
                    "eval/kl": float(total[2]) / n}

        transform_eval = generator_transform(data.image_size, data.channels, hflip=False)

        # -- loop ----------------------------------------------------------------------------
        loop = TrainLoop(run, Phase("train", model, optimizer, train_step, scheduler=scheduler), eval_fn=test_loss,
                         data_counters=reader.problems, data_names={"": str(train_split.root)})
        result = loop.fit(reader.loader, batches_per_epoch=reader.batches_per_epoch,
                          num_epochs=cfg.train.num_epochs, max_steps=cfg.train.max_steps)

        # -- save ----------------------------------------------------------------------------
        model_dir = run.save_model(model, card)
        if run.is_main:
            run.save_artifact(write_class_samples(run.eval_model(model), run.run_dir / "samples.png", cfg.runtime.seed))
        summary = loop.summary(result, model_dir=str(model_dir), **reader.manifest_counts())
        run.finish(summary, step=result["step"])
        run.print_summary(summary)


def write_class_samples(net: CVAE, path: Path, seed: int, per_class: int = 8) -> Path:
    """One row per class (up to 16 classes) of images decoded from z ~ N(0, I): what the CVAE learned."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(min(net.num_classes, 16)).repeat_interleave(per_class)
    z = torch.randn(len(classes), net.latent_dim, generator=generator)
    device = next(net.parameters()).device
    net.eval()
    with torch.no_grad():
        images = net.decode(net.class_embedding(classes.to(device)), z.to(device))
    return files.write_image_grid(path, images, nrow=per_class)


if __name__ == "__main__":
    entrypoint(main)
