"""Benchmark: training-step throughput of the shared loop against a bare PyTorch loop.

Same model (same initial weights), same optimizer, batch and in-memory data, in the same
process; the two alternate `repeats` times and the median images/s of each is reported
with the median ratio of each shared repeat to the bare
repeats on either side of it (target >= 0.97). Not a test: a measurement to quote.
`networks=gan` times the two-network step of a GAN instead (disttrain.models.small_gan:
the loop's G phase + D phase, hinge loss, against a hand-written G step then D step that
freezes the other network the same way).

    python recipes/benchmark.py --preset cpu                  # ResNet-18 at 64 px
    python recipes/benchmark.py --preset gan_cpu              # G + D at 32 px
    python recipes/benchmark.py --preset resnet50_448_cpu     # ResNet-50 at 448 px, batch 8
    accelerate launch --num_processes 1 recipes/benchmark.py --preset resnet50_448 runtime.precision=bf16
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from disttrain import config
from disttrain.config import BenchmarkConfig
from disttrain.models.classifier import build_classifier
from disttrain.models.small_gan import LATENT, SmallDiscriminator, SmallGenerator
from disttrain.runtime import Phase, TrainLoop, entrypoint, start_run
from disttrain.runtime.optim import build_optimizer


def images_per_s(stamps: list[float], warmup: int, steps: int, batch: int) -> float:
    return steps * batch / (stamps[warmup + steps] - stamps[warmup])


def classifier_pair(cfg: BenchmarkConfig, run, to_device, autocast_dtype):
    """(bare step, the loop's phases, model name) for one network, one phase."""
    base = build_classifier(num_outputs=cfg.num_classes, image_size=cfg.image_size, **cfg.model.arguments())
    memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    bare_model = copy.deepcopy(base).to(run.device, memory_format=memory_format)
    loop_model = copy.deepcopy(base).to(run.device, memory_format=memory_format)
    bare_optimizer = build_optimizer(cfg.optim, cfg.batch, bare_model)

    def bare_step(images, labels) -> None:
        with torch.autocast(run.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(bare_model(images), labels)
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    loop_optimizer = build_optimizer(cfg.optim, cfg.batch, loop_model)
    loop_model, loop_optimizer = run.prepare(loop_model, loop_optimizer)

    def step(batch):
        images, labels = to_device(*batch)
        return {"loss": F.cross_entropy(loop_model(images), labels)}

    return bare_model, bare_step, [Phase("train", loop_model, loop_optimizer, step)], cfg.model.name


def gan_pair(cfg: BenchmarkConfig, run, to_device, autocast_dtype):
    """(bare step, the loop's phases, model name) for a GAN: G phase then D phase, hinge loss."""
    torch.manual_seed(0)
    base_g, base_d = SmallGenerator(cfg.num_classes, cfg.image_size), SmallDiscriminator(cfg.num_classes)
    nets = {name: [copy.deepcopy(net).to(run.device) for _ in range(2)] for name, net in (("G", base_g), ("D", base_d))}
    (bare_g, loop_g), (bare_d, loop_d) = nets["G"], nets["D"]

    def adam(net):
        return torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(0.0, 0.99))

    def g_loss(g, d, images, labels):
        z = torch.randn(images.shape[0], LATENT, device=run.device)
        return -d(g(z, labels), labels).mean()

    def d_loss(g, d, images, labels):
        with torch.no_grad():
            fakes = g(torch.randn(images.shape[0], LATENT, device=run.device), labels)
        return F.relu(1 - d(images, labels)).mean() + F.relu(1 + d(fakes, labels)).mean()

    bare_opts = {"G": adam(bare_g), "D": adam(bare_d)}

    def bare_step(images, labels) -> None:
        for name, trained, frozen, loss_fn in (("G", bare_g, bare_d, g_loss), ("D", bare_d, bare_g, d_loss)):
            trained.requires_grad_(True)
            frozen.requires_grad_(False)
            with torch.autocast(run.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_fn(bare_g, bare_d, images, labels)
            loss.backward()
            bare_opts[name].step()
            bare_opts[name].zero_grad(set_to_none=True)

    g_opt, d_opt = adam(loop_g), adam(loop_d)
    loop_g, loop_d, g_opt, d_opt = run.prepare(loop_g, loop_d, g_opt, d_opt)

    def phase(loss_fn):
        return lambda batch: {"loss": loss_fn(loop_g, loop_d, *to_device(*batch))}

    phases = [Phase("G", loop_g, g_opt, phase(g_loss)), Phase("D", loop_d, d_opt, phase(d_loss))]
    return nn.ModuleList([bare_g, bare_d]), bare_step, phases, "small_gan"


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(BenchmarkConfig, argv)
    with start_run(cfg) as run:
        if run.world_size != 1:
            raise config.ConfigError("the benchmark compares loops inside one process: launch it with 1 process")
        # -- build: the same networks twice, fixed data -----------------------------------------
        memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
        generator = torch.Generator().manual_seed(0)
        batch = cfg.batch.micro_size
        per_repeat = cfg.warmup_steps + cfg.num_steps + 1  # +1: the stamp that closes the last timed step
        data = [(torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator),
                 torch.randint(0, cfg.num_classes, (batch,), generator=generator)) for _ in range(per_repeat)]

        def to_device(images, labels):
            return images.to(run.device, memory_format=memory_format, non_blocking=True), labels.to(run.device)

        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.runtime.precision)
        pair = gan_pair if cfg.networks == "gan" else classifier_pair
        bare_model, bare_step, phases, model_name = pair(cfg, run, to_device, autocast_dtype)

        # -- the bare loop ----------------------------------------------------------------------
        @torch.enable_grad()  # it also runs from the shared loop's eval hook, which is under no_grad
        def bare_repeat() -> float:
            bare_model.train()
            stamps = []
            for images, labels in data:
                stamps.append(time.perf_counter())
                bare_step(*to_device(images, labels))
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            return images_per_s(stamps, cfg.warmup_steps, cfg.num_steps, batch)

        # -- the shared loop (same step), bare repeats interleaved at its epoch ends ---------------
        stamps: list[float] = []
        results = {"bare": [bare_repeat()], "shared": []}
        first = phases[0].step_fn

        def stamped(batch):
            stamps.append(time.perf_counter())
            return first(batch)

        phases[0].step_fn = stamped

        def epoch_end() -> dict[str, float]:
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            results["shared"].append(images_per_s(stamps, cfg.warmup_steps, cfg.num_steps, batch))
            stamps.clear()
            results["bare"].append(bare_repeat())
            return {}

        loop = TrainLoop(run, phases, eval_fn=epoch_end)
        loop.fit(lambda epoch, skip: iter(data[skip:]), batches_per_epoch=per_repeat, num_epochs=cfg.repeats)

        # -- report -------------------------------------------------------------------------------
        bare, shared = statistics.median(results["bare"]), statistics.median(results["shared"])
        # each shared repeat against the two bare repeats around it: drift cancels within a pair
        paired = [s / ((b0 + b1) / 2) for s, b0, b1 in zip(results["shared"], results["bare"], results["bare"][1:])]
        summary = {"networks": cfg.networks, "model": model_name, "image_size": cfg.image_size, "batch": batch,
                   "precision": cfg.runtime.precision, "device": str(run.device),
                   "bare_images_per_s": bare, "shared_loop_images_per_s": shared,
                   "ratio": statistics.median(paired),
                   "repeats": cfg.repeats, "bare_all": results["bare"], "shared_all": results["shared"]}
        run.log({"bench/bare_images_per_s": bare, "bench/shared_images_per_s": shared, "bench/ratio": summary["ratio"]},
                loop.state.step)
        run.finish(summary, step=loop.state.step)
        run.print_summary({k: v for k, v in summary.items() if not k.endswith("_all")})


if __name__ == "__main__":
    entrypoint(main)
