"""Phases, hooks and several networks in the one training loop, shown on a small class-conditional
GAN (tests/gan_stage.py: G + projection D, hinge loss, lazy R1 every 16 steps, an EMA of G by
half-life, an ADA-style hook with state) under 2 gloo processes."""

from __future__ import annotations

import statistics

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import interrupt_at_step

GAN = "../tests/gan_stage.py"  # launched like a recipe (recipes/ + this path)


def gan_args(demo_root, *extra: str) -> list[str]:
    return ["--preset", "debug", f"data.root={demo_root}", "train.max_steps=40", "runtime.log_every=2",
            "data.num_workers=1", "tracking.enabled=false", *extra]


@pytest.mark.slow
def test_a_gan_trains_on_two_processes_with_identical_replicas(launch, demo_root):
    run = launch(GAN, *gan_args(demo_root))
    assert run.returncode == 0, run.output[-3000:]
    assert run.json("run.json")["world_size"] == 2
    assert run.json("replicas.json")["identical"]  # G and D, summed over both networks' parameters
    summary = run.json("summary.json")
    assert summary["step"] == 40 and summary["r1_logged"] and summary["skipped_steps"] == 0
    d_losses = summary["d_losses"]
    assert len(d_losses) == 20
    # a GAN's D: it starts near the hinge's 2 (logits ~0), learns to tell reals from fakes
    # (below 2) and is pushed back by G: it moves, it is neither stuck nor collapsed to 0
    first, last = statistics.mean(d_losses[:5]), statistics.mean(d_losses[-5:])
    assert last < first and min(d_losses) < 2.0 and statistics.pstdev(d_losses) > 0.05, d_losses
    assert all(0.5 < loss < 4.0 for loss in d_losses), d_losses
    losses = [line for line in run.output.splitlines() if line.startswith("step ")]
    assert any("G/loss" in line and "D/loss" in line and "D_r1/loss" in line for line in losses), losses[:4]


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_for_every_network_and_hook(launch, demo_root, tmp_path):
    args = gan_args(demo_root)
    straight = launch(GAN, *args, run_dir=tmp_path / "straight")
    assert straight.returncode == 0, straight.output[-3000:]

    run_dir = tmp_path / "interrupted"
    status = interrupt_at_step(GAN, args, run_dir, tmp_path, step=18)
    assert 18 <= status["step"] < 40 and status.get("checkpoint"), status  # saved, not ended by the watchdog
    resumed = launch(GAN, *args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{status['step']:08d}" in resumed.output
    a, b = load_file(straight.run_dir / "networks.safetensors"), load_file(run_dir / "networks.safetensors")
    assert a.keys() == b.keys() and {"flip.p", "flip.signs"} <= a.keys()
    assert any(k.startswith("G_ema.") for k in a) and any(k.startswith("D.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ after resume: {differ[:8]}"


@pytest.mark.slow
def test_deepspeed_zero2_trains_a_gan_with_one_engine_per_network(launch, demo_root):
    run = launch(GAN, *gan_args(demo_root, "train.max_steps=10", "runtime.strategy=deepspeed", "runtime.zero_stage=2"))
    assert run.returncode == 0, run.output[-3000:]
    assert run.json("run.json")["strategy"] == "deepspeed" and run.json("replicas.json")["identical"]
    summary = run.json("summary.json")
    assert summary["step"] == 10 and summary["r1_logged"] and summary["skipped_steps"] == 0
    for losses in (summary["d_losses"], summary["g_losses"]):  # each engine steps its own network
        assert len(losses) == 5 and statistics.pstdev(losses) > 0.05, summary
    final = run.run_dir / "checkpoints" / "step-00000010"
    assert (final / "pytorch_model").is_dir() and (final / "pytorch_model_1").is_dir()  # G's engine, D's engine
    assert "create a separate `Accelerator()`" not in run.output


def test_fsdp_refuses_r1s_double_backward_before_compute(launch, demo_root):
    run = launch(GAN, *gan_args(demo_root, "runtime.strategy=fsdp"))
    assert run.returncode != 0 and run.json("run.json")["world_size"] == 2, run.output[-3000:]
    assert run.status()["state"] == "failed" and not list((run.run_dir / "checkpoints").glob("step-*"))
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert errors and "phase 'D_r1'" in errors[0] and "double backward" in errors[0], run.output[-3000:]
    assert "use runtime.strategy=ddp, or deepspeed with runtime.zero_stage=1 or 2" in errors[0]
