"""A small class-conditional GAN trained through the one training loop: the test of phases,
hooks and multi-network checkpoints (tests/test_phases.py) before the generative stages
build on them.

Generator and projection discriminator on the demo birds (16 px with the debug preset),
hinge loss, R1 on reals every 16 steps (lazy, loss gain 16: StyleGAN2), an EMA of the
generator by half-life in images with ramp-up, and an ADA-style hook with state: it
tracks r_t = E[sign D(real)] over 4 steps and moves the probability p of a horizontal flip
applied to everything D sees by 0.01, up while r_t > 0 (ADA's target is 0.6; 0 here, so
that p moves within a few dozen steps and its restored state matters).

    accelerate launch --multi_gpu --num_processes 2 tests/gan_stage.py --preset debug data.root=... \\
        train.max_steps=40 run_dir=...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain import config  # noqa: E402
from disttrain.config import TrainClassifierConfig  # noqa: E402
from disttrain.data.shards import ShardSplit  # noqa: E402
from disttrain.data.stream import ShardReader  # noqa: E402
from disttrain.data.transforms import train_transform  # noqa: E402
from disttrain.models.small_gan import LATENT, SmallDiscriminator, SmallGenerator  # noqa: E402
from disttrain.runtime import Phase, TrainLoop, entrypoint, report, start_run  # noqa: E402
from disttrain.runtime.hooks import HalfLifeEMA  # noqa: E402

R1_EVERY, R1_GAMMA = 16, 0.1


class FlipTuner:
    """ADA's heuristic on a flip: every `interval` steps, p += step * sign(r_t - target), where
    r_t = E[sign D(real)] summed over ranks since the last adjustment."""

    def __init__(self, device: torch.device, interval: int = 4, target: float = 0.0, step: float = 0.01):
        self.interval, self.target, self.step = interval, target, step
        self.p = 0.0
        self.signs = torch.zeros(2, device=device)  # sum of sign(D(real)), count

    def observe(self, real_logits: torch.Tensor) -> None:
        self.signs += torch.stack([real_logits.detach().sign().sum(), torch.tensor(float(real_logits.numel()),
                                                                                   device=self.signs.device)])

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < self.p
        return torch.where(flip, images.flip(-1), images)

    def after_step(self, loop: TrainLoop) -> None:
        if loop.state.step % self.interval:
            return
        total = loop.acc.reduce(self.signs.clone(), reduction="sum")
        r_t = float(total[0] / total[1].clamp(min=1))
        self.p = min(max(self.p + self.step * (1 if r_t > self.target else -1), 0.0), 1.0)
        self.signs.zero_()
        report("aug/r_t", r_t)

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "signs": self.signs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p = float(state["p"])
        self.signs.copy_(state["signs"])


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(TrainClassifierConfig, argv)
    data = cfg.data
    train_split = ShardSplit.open(Path(data.root) / data.train_split)
    with start_run(cfg) as run:
        torch.manual_seed(cfg.runtime.seed)
        G, D = SmallGenerator(train_split.num_classes, data.image_size), SmallDiscriminator(train_split.num_classes)
        G, D = run.place(G), run.place(D)
        reader = ShardReader(train_split, train_transform(data.image_size, data.resize_size, data.augment, data.hflip),
                             batch_size=cfg.batch.micro_size, rank=run.rank, world_size=run.world_size,
                             num_workers=data.num_workers, seed=cfg.runtime.seed)
        g_opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.0, 0.99))
        d_opt = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.0, 0.99))
        G, D, g_opt, d_opt = run.prepare(G, D, g_opt, d_opt)
        ema = HalfLifeEMA(G, half_life_images=10 * cfg.batch.global_size, images_per_step=cfg.batch.global_size,
                          rampup=0.05)
        tuner = FlipTuner(run.device)

        def fakes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(0, train_split.num_classes, (n,), device=run.device)
            return G(torch.randn(n, LATENT, device=run.device), labels), labels

        D_in_g = run.accelerator.unwrap_model(D)  # D as G's phase runs it: untrained there (see Phase)

        def g_main(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            images, labels = fakes(batch[0].shape[0])
            return {"loss": -D_in_g(tuner.augment(images), labels).mean()}

        def d_main(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            reals, labels = batch[0].to(run.device), batch[1].to(run.device)
            with torch.no_grad():
                images, fake_labels = fakes(reals.shape[0])
            real_logits = D(tuner.augment(reals), labels)
            tuner.observe(real_logits)
            fake_logits = D(tuner.augment(images), fake_labels)
            loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
            return {"loss": loss, "real_logit": real_logits.mean(), "fake_logit": fake_logits.mean()}

        def d_r1(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            reals = tuner.augment(batch[0].to(run.device)).requires_grad_(True)
            logits = D(reals, batch[1].to(run.device))
            grads, = torch.autograd.grad(logits.sum(), reals, create_graph=True)
            penalty = grads.square().sum([1, 2, 3]).mean()
            report("loss/r1_penalty", penalty)
            # logits * 0: every parameter of D takes part, as DDP expects (StyleGAN2-ADA's trick)
            return {"loss": (logits * 0).mean() + penalty * (R1_GAMMA / 2)}

        loop = TrainLoop(run, [Phase("G", G, g_opt, g_main), Phase("D", D, d_opt, d_main),
                               Phase("D_r1", D, d_opt, d_r1, every=R1_EVERY, double_backward=True)],
                         hooks={"ema": ema, "flip": tuner}, data_counters=reader.problems)
        result = loop.fit(reader.loader, batches_per_epoch=reader.batches_per_epoch,
                          num_epochs=cfg.train.num_epochs, max_steps=cfg.train.max_steps)
        if run.is_main:
            unwrap = run.accelerator.unwrap_model
            tensors = {**{f"G.{k}": v for k, v in unwrap(G).state_dict().items()},
                       **{f"D.{k}": v for k, v in unwrap(D).state_dict().items()},
                       **{f"G_ema.{k}": v for k, v in ema.module.state_dict().items()},
                       "flip.p": torch.tensor(tuner.p, dtype=torch.float64), "flip.signs": tuner.signs}
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(run.run_dir / "networks.safetensors"))
        d_losses = [h["train/D/loss"] for h in loop.history if "train/D/loss" in h]
        g_losses = [h["train/G/loss"] for h in loop.history if "train/G/loss" in h]
        summary = loop.summary(result, d_losses=d_losses, g_losses=g_losses, flip_p=tuner.p,
                               r1_logged=any("loss/r1_penalty" in h for h in loop.history))
        run.finish(summary, step=result["step"])
        run.print_summary(summary)


if __name__ == "__main__":
    entrypoint(main)
