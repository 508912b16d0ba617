"""Stage: synthesize pseudo-OOD images into shards.

method=cmg (cmg.txt Section 3.2, Eq. 4): a finished CVAE decodes abnormal conditions -- the
class-mixed embedding k * y_ci + (1 - k) * y_cj, k ~ Bernoulli(0.5) per component, c_i != c_j --
with z ~ N(0, sigma^2 I), sigma = 5 (optionally every component of z outside [-t, t]). As many
images as the CVAE's ID training images by default (cmg.ratio, or cmg.count).

Every rank generates its share and writes its own shards (pseudo_ood/rank-NNN/); rank 0 then
writes the split's manifest.json, last, so a split with a manifest is complete. The same seed
and world size give the same images.

    accelerate launch --multi_gpu --num_processes 8 recipes/synthesize.py --preset cifar10 method=cmg \
        cvae=runs/train_cvae/cifar10 classifier=runs/train_classifier/cifar10
    sbatch slurm/synthesize.sh --preset cifar10 method=cmg cvae=... classifier=...

Output (run_dir): pseudo_ood/ (a shard split: rank-NNN/*.tar + manifest.json), grid.png (also in
MLflow), summary.json.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from disttrain import config, files
from disttrain.config import ConfigError, SynthesizeConfig
from disttrain.data.shards import seed_of, write_manifest, write_shard
from disttrain.methods.cmg import mixed_conditions, sample_latents
from disttrain.runtime import entrypoint, start_run
from disttrain.models.cards import ModelCard
from disttrain.runtime.saved import load_saved_cvae, saved_cvae_card, saved_model_card

PSEUDO_DIR = "pseudo_ood"


def check_inputs(cfg: SynthesizeConfig) -> tuple[ModelCard, int]:
    """The CVAE's card and the number of images to make; ConfigError before any compute."""
    try:
        card = saved_cvae_card(cfg.cvae)
    except ConfigError as err:
        raise ConfigError(f"cvae={cfg.cvae!r}: {err}") from None
    if cfg.classifier:
        try:
            classifier = saved_model_card(cfg.classifier)
        except ConfigError as err:
            raise ConfigError(f"classifier={cfg.classifier!r}: {err}") from None
        if classifier.classes != card.classes:
            raise ConfigError(
                f"cvae={cfg.cvae!r} was trained on {card.num_classes} classes ({card.classes[:3]}...) but "
                f"classifier={cfg.classifier!r} on {classifier.num_classes} ({classifier.classes[:3]}...): "
                f"pseudo-OOD data must come from a CVAE trained on the classifier's ID classes -- train one with "
                f"recipes/train_cvae.py data.root=<the classifier's data.root>")
    if card.num_classes < 2:
        raise ConfigError(f"cvae={cfg.cvae!r} knows {card.num_classes} class; class mixing needs at least 2")
    num_train = card.details.get("num_train_samples", 0)
    count = cfg.cmg.count or int(round(cfg.cmg.ratio * num_train))
    if count < 1:
        raise ConfigError(f"cmg.ratio={cfg.cmg.ratio} of {num_train} ID training images is an "
                          f"empty pseudo-OOD set: raise cmg.ratio or set cmg.count")
    return card, count


def png_bytes(image: torch.Tensor) -> bytes:
    """[C, H, W] in [0, 1] -> lossless PNG."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0)))
    out = io.BytesIO()
    pil.save(out, format="PNG")
    return out.getvalue()


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(SynthesizeConfig, argv)
    card, count = check_inputs(cfg)

    with start_run(cfg) as run:
        started = time.perf_counter()
        cvae, _ = load_saved_cvae(cfg.cvae)
        cvae = cvae.to(run.device)
        out_dir = run.run_dir / PSEUDO_DIR
        rank_dir = out_dir / f"rank-{run.rank:03d}"
        if run.is_main:
            (out_dir / "manifest.json").unlink(missing_ok=True)  # the split is incomplete until the end
        shutil.rmtree(rank_dir, ignore_errors=True)
        rank_dir.mkdir(parents=True)

        # this rank's share of the images, in global index order
        first, last = run.rank * count // run.world_size, (run.rank + 1) * count // run.world_size
        generator = torch.Generator().manual_seed(seed_of(cfg.runtime.seed, "cmg", run.rank, run.world_size))
        table = cvae.class_embedding.weight.detach().cpu()
        shards, buffer, grid = [], [], []
        for start in range(first, last, cfg.batch_size):
            run.progress("synthesize")
            n = min(cfg.batch_size, last - start)
            mixed = mixed_conditions(table, n, generator)
            z = sample_latents(n, cvae.latent_dim, cfg.cmg.sigma, generator, cfg.cmg.filter_t)
            with torch.no_grad(), run.autocast():
                images = cvae.decode(mixed.embeddings.to(run.device), z.to(run.device)).float().cpu()
            if len(grid) < cfg.grid_size:
                grid.extend(images[: cfg.grid_size - len(grid)])
            for offset, image in enumerate(images):
                buffer.append({"__key__": f"cmg-{start + offset:09d}", "png": png_bytes(image), "cls": b"-1",
                               "json": json.dumps({"class_i": int(mixed.class_i[offset]),
                                                   "class_j": int(mixed.class_j[offset])}).encode()})
                if len(buffer) == cfg.samples_per_shard:
                    shards.append(write_shard(rank_dir, len(shards), buffer))
                    buffer = []
        if buffer:
            shards.append(write_shard(rank_dir, len(shards), buffer))
        for shard in shards:  # the manifest names files relative to the split's root
            shard["name"] = f"{rank_dir.name}/{shard['name']}"
            if shard.get("index"):
                shard["index"] = f"{rank_dir.name}/{shard['index']}"
        elapsed = time.perf_counter() - started

        every = run.gather_objects({"shards": shards, "seconds": elapsed})
        summary: dict[str, Any] = {}
        if run.is_main:
            all_shards = [shard for part in every for shard in part["shards"]]
            write_manifest(out_dir, [], all_shards, [], source="synthesize", method=cfg.method,
                           cvae=str(Path(cfg.cvae).resolve()), id_classes=card.classes, sigma=cfg.cmg.sigma,
                           filter_t=cfg.cmg.filter_t, seed=cfg.runtime.seed, world_size=run.world_size)
            run.log_data("pseudo_ood", out_dir / "manifest.json")
            if grid:
                run.save_artifact(files.write_image_grid(run.run_dir / "grid.png", torch.stack(grid)))
            slowest = max(part["seconds"] for part in every)
            summary = {"num_images": count, "num_shards": len(all_shards), "images_per_s": count / slowest,
                       "sigma": cfg.cmg.sigma, "filter_t": cfg.cmg.filter_t, "world_size": run.world_size,
                       "pseudo_ood": str(out_dir)}
            run.log({"images_per_s": summary["images_per_s"]}, 0)
        run.finish(summary, step=0)
        run.print_summary(summary)


if __name__ == "__main__":
    entrypoint(main)
