"""Benchmark: training-step throughput of the shared loop against a bare PyTorch loop.

Same model (same initial weights), same optimizer, batch and in-memory data, in the same
process; the two alternate `repeats` times and the median images/s of each is reported
with the median ratio of each shared repeat to the bare
repeats on either side of it (target >= 0.97). Not a test: a measurement to quote.

    python recipes/benchmark.py --preset cpu                  # ResNet-18 at 64 px
    python recipes/benchmark.py --preset resnet50_448_cpu     # ResNet-50 at 448 px, batch 8
    accelerate launch --num_processes 1 recipes/benchmark.py --preset resnet50_448 runtime.precision=bf16
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from disttrain import config
from disttrain.config import BenchmarkConfig
from disttrain.models.classifier import build_classifier
from disttrain.runtime import Phase, TrainLoop, entrypoint, start_run
from disttrain.runtime.optim import build_optimizer


def images_per_s(stamps: list[float], warmup: int, steps: int, batch: int) -> float:
    return steps * batch / (stamps[warmup + steps] - stamps[warmup])


def main(argv: list[str]) -> None:
    cfg = config.parse_cli(BenchmarkConfig, argv)
    with start_run(cfg) as run:
        if run.world_size != 1:
            raise config.ConfigError("the benchmark compares loops inside one process: launch it with 1 process")
        # -- build: two identical models, fixed data ------------------------------------------
        base = build_classifier(cfg.model, cfg.num_classes, cfg.image_size)
        memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
        bare_model = copy.deepcopy(base).to(run.device, memory_format=memory_format)
        loop_model = copy.deepcopy(base).to(run.device, memory_format=memory_format)
        generator = torch.Generator().manual_seed(0)
        batch = cfg.batch.micro_size
        per_repeat = cfg.warmup_steps + cfg.num_steps + 1  # +1: the stamp that closes the last timed step
        data = [(torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator),
                 torch.randint(0, cfg.num_classes, (batch,), generator=generator)) for _ in range(per_repeat)]

        def to_device(images, labels):
            return images.to(run.device, memory_format=memory_format, non_blocking=True), labels.to(run.device)

        # -- the bare loop ----------------------------------------------------------------------
        bare_optimizer = build_optimizer(cfg.optim, cfg.batch, bare_model)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.runtime.precision)

        @torch.enable_grad()  # it also runs from the shared loop's eval hook, which is under no_grad
        def bare_repeat() -> float:
            bare_model.train()
            stamps = []
            for images, labels in data:
                stamps.append(time.perf_counter())
                images, labels = to_device(images, labels)
                with torch.autocast(run.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = F.cross_entropy(bare_model(images), labels)
                loss.backward()
                bare_optimizer.step()
                bare_optimizer.zero_grad(set_to_none=True)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            return images_per_s(stamps, cfg.warmup_steps, cfg.num_steps, batch)

        # -- the shared loop (same step), bare repeats interleaved at its epoch ends ---------------
        loop_optimizer = build_optimizer(cfg.optim, cfg.batch, loop_model)
        loop_model, loop_optimizer = run.prepare(loop_model, loop_optimizer)
        stamps: list[float] = []
        results = {"bare": [bare_repeat()], "shared": []}

        def step(b):
            stamps.append(time.perf_counter())
            images, labels = to_device(*b)
            return {"loss": F.cross_entropy(loop_model(images), labels)}

        def epoch_end() -> dict[str, float]:
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            results["shared"].append(images_per_s(stamps, cfg.warmup_steps, cfg.num_steps, batch))
            stamps.clear()
            results["bare"].append(bare_repeat())
            return {}

        loop = TrainLoop(run, Phase("train", loop_model, loop_optimizer, step), eval_fn=epoch_end)
        loop.fit(lambda epoch, skip: iter(data[skip:]), batches_per_epoch=per_repeat, num_epochs=cfg.repeats)

        # -- report -------------------------------------------------------------------------------
        bare, shared = statistics.median(results["bare"]), statistics.median(results["shared"])
        # each shared repeat against the two bare repeats around it: drift cancels within a pair
        paired = [s / ((b0 + b1) / 2) for s, b0, b1 in zip(results["shared"], results["bare"], results["bare"][1:])]
        summary = {"model": cfg.model.name, "image_size": cfg.image_size, "batch": batch,
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
