"""recipes/benchmark.py through its entry point: the shared loop against a bare loop, for one
network and for a GAN's two-network step (the figures themselves are measured, not asserted)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("networks", ["classifier", "gan"])
def test_benchmark_compares_the_loop_with_a_bare_one(launch, networks):
    run = launch("benchmark.py", "--preset", "debug", f"networks={networks}", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    summary = run.json("summary.json")
    assert summary["networks"] == networks and summary["model"] == ("small_gan" if networks == "gan" else "resnet10t")
    assert summary["bare_images_per_s"] > 0 and summary["shared_loop_images_per_s"] > 0 and summary["ratio"] > 0
    assert len(summary["bare_all"]) == summary["repeats"] + 1 and len(summary["shared_all"]) == summary["repeats"]
