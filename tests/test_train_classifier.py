"""The first stage through its real entry point: `accelerate launch recipes/train_classifier.py`."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from disttrain.data.shards import ShardSplit
from disttrain.data.stream import ShardReader
from tests.conftest import interrupt_at_step

pytestmark = pytest.mark.slow


def debug_args(demo_root, *extra):
    return ["--preset", "debug", f"data.root={demo_root}", "data.num_workers=1", *extra]


def test_two_process_ddp_keeps_replicas_identical(launch, demo_root, tmp_path):
    run = launch("train_classifier.py", *debug_args(demo_root, "train.max_steps=8"), nproc=2)
    assert run.returncode == 0, run.output[-3000:]
    info, status, replicas = run.json("run.json"), run.status(), run.json("replicas.json")
    assert info["world_size"] == 2 and info["strategy"] == "ddp"
    assert status["state"] == "finished" and status["step"] == 8
    assert replicas["identical"] and len(replicas["checksums"]) == 2
    assert replicas["checksums"][0] == replicas["checksums"][1]
    # ...while each rank trained on a part of the epoch of its own
    split = ShardSplit.open(demo_root / "train")
    readers = [ShardReader(split, None, batch_size=8, rank=r, world_size=2, num_workers=1, seed=0) for r in range(2)]
    assert [r.slot_range(0) for r in readers] == [(0, 1000), (1000, 2000)]  # halves of the epoch's permutation
    shares = [r.rank_positions(0) for r in readers]  # random halves: disjoint, every class in each
    assert not set(shares[0]) & set(shares[1]) and all(len(set(split.index.labels[s])) == 10 for s in shares)
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run.json("run.json")["mlflow_run_id"]).data
    # nothing damaged: no data/* curve, the totals once at the end
    assert logged.metrics["data/total/corrupt_samples"] == 0 and logged.metrics["data/total/unreadable_samples"] == 0
    assert not [key for key in logged.metrics if key.startswith("data/") and not key.startswith("data/total/")]
    assert logged.metrics["data/total/served_samples"] >= 8 * 16 and logged.params["data.train.num_samples"] == "2000"
    # the summary a user reads, and the MLflow run behind it
    assert "== train_classifier finished ==" in run.output and "mlflow ui" in run.output
    mlflow_run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(info["mlflow_run_id"])
    assert mlflow_run.data.params["batch.global_size"] == "16" and mlflow_run.data.params["resolved.world_size"] == "2"
    assert "train/loss" in mlflow_run.data.metrics and "perf/samples_per_s" in mlflow_run.data.metrics
    assert "eval/acc1" in mlflow_run.data.metrics and mlflow_run.info.status == "FINISHED"
    assert (run.run_dir / "model" / "model.safetensors").is_file()
    assert len(json.loads((run.run_dir / "model" / "model.json").read_text())["classes"]) == 10


def test_deepspeed_zero2_on_cpu_through_the_same_recipe(launch, demo_root):
    run = launch("train_classifier.py", *debug_args(demo_root, "train.max_steps=4", "runtime.strategy=deepspeed",
                                                    "runtime.zero_stage=2", "batch.micro_size=4"), nproc=2)
    assert run.returncode == 0, run.output[-3000:]
    assert run.json("run.json")["strategy"] == "deepspeed" and run.json("run.json")["world_size"] == 2
    assert run.status()["state"] == "finished" and run.json("replicas.json")["identical"]
    assert "ZeRO" in run.output or "zero" in run.output.lower()
    ckpt = next((run.run_dir / "checkpoints").glob("step-*"))
    assert (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own sharded layout, written by save_state

    # DeepSpeed reads its files with torch.load(weights_only=False); here with the weights-only
    # unpickler: a planted optimizer file (its checksum forged too) is refused, its code never runs
    import pickle

    from disttrain import files
    from disttrain.runtime.checkpoint import META, _sha256

    marker = run.run_dir.parent / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    victim = next((ckpt / "pytorch_model").glob("zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": Planted()}, victim, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    meta = json.loads((ckpt / META).read_text())
    meta["files"][victim.relative_to(ckpt).as_posix()] = {"size": victim.stat().st_size, "sha256": _sha256(victim)}
    files.write_json(ckpt / META, meta)
    resumed = launch("train_classifier.py", *debug_args(demo_root, "train.max_steps=6", "runtime.strategy=deepspeed",
                                                        "runtime.zero_stage=2", "batch.micro_size=4"), nproc=2)
    assert resumed.returncode != 0 and "Weights only load failed" in resumed.output, resumed.output[-3000:]
    assert not marker.exists()


@pytest.mark.parametrize("strategy", [["runtime.strategy=fsdp"], ["runtime.strategy=deepspeed", "runtime.zero_stage=3"]],
                         ids=["fsdp", "zero3"])
def test_sharded_strategies_train_evaluate_and_save_whole_weights(launch, demo_root, strategy):
    """Parameters sharded across ranks: evaluation forwards stay in lock-step (the test split does
    not divide evenly into batches), and the saved model is whole."""
    run = launch("train_classifier.py", *debug_args(demo_root, "train.max_steps=2", "batch.micro_size=4",
                                                    "runtime.eval_every=1", *strategy), nproc=2)
    assert run.returncode == 0, run.output[-3000:]
    assert run.status()["state"] == "finished" and run.status()["step"] == 2
    assert 0.0 <= run.status()["eval/acc1"] <= 1.0
    weights = load_file(run.run_dir / "model" / "model.safetensors")
    assert weights["fc.weight"].shape == (10, 512)  # gathered, not a shard


def test_sigterm_then_resume_equals_uninterrupted(launch, demo_root, tmp_path):
    args = debug_args(demo_root, "train.max_steps=24", "runtime.log_every=1", "data.num_workers=2",
                      "runtime.ema_decay=0.9")
    straight = launch("train_classifier.py", *args, run_dir=tmp_path / "straight")
    assert straight.returncode == 0, straight.output[-3000:]

    run_dir = tmp_path / "interrupted"
    status = interrupt_at_step("train_classifier.py", args, run_dir, tmp_path, step=3)
    assert 3 <= status["step"] < 24

    resumed = launch("train_classifier.py", *args, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{status['step']:08d}" in resumed.output
    assert resumed.status()["step"] == 24
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight.run_dir / "model" / name), load_file(run_dir / "model" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_an_unreadable_test_image_never_costs_the_training(launch, demo_root, tmp_path):
    """One undecodable image in the evaluation split is skipped and counted; and the final state is
    saved before the final evaluation, so an evaluation that fails (here: no damage allowed) loses
    nothing -- the next run resumes at the last step and only evaluates."""
    import io

    from disttrain.data.shards import ShardSplitWriter
    from disttrain.data.sources import open_source

    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(demo_root / "train")
    test = open_source(str(demo_root / "test"), 32)
    writer = ShardSplitWriter(root / "test", 40, test.classes)
    for image, label, index in test.stream(lambda img: img, 0, 1):
        if index == 80:
            break
        png = io.BytesIO()
        image.save(png, format="PNG")
        writer.write(f"test/{index:04d}", png.getvalue(), "png", label, {})
    writer.write("test/broken", b"\xff\xd8 not really a jpeg", "jpg", 0, {})
    writer.close()

    args = ["--preset", "debug", f"data.root={root}", "runtime.log_every=1"]
    strict = launch("train_classifier.py", *args, "data.max_bad_fraction=0", nproc=1)
    assert strict.returncode == 2, strict.output[-3000:]
    assert "1 of the 81 samples read so far are damaged" in strict.output
    final = strict.run_dir / "checkpoints" / "step-00000006"
    assert json.loads((final / "meta.json").read_text())["final"]  # saved before the evaluation failed

    again = launch("train_classifier.py", *args, nproc=1)
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {final}" in again.output and "step 1/" not in again.output  # no training again
    summary = again.json("summary.json")
    assert summary["eval/damaged_samples"] == 1 and summary["step"] == 6
