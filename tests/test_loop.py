"""The shared training loop in one process: non-finite guard, EMA, accumulation, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from timm.utils import ModelEmaV3

from disttrain import config
from disttrain.config import TrainClassifierConfig
from disttrain.runtime import NonFiniteLossError, Phase, TrainLoop, start_run
from disttrain.runtime.checkpoint import complete_checkpoints


_OPEN_RUNS = []


@pytest.fixture(autouse=True)
def close_runs():
    """In-process runs end with their test: a run left open keeps its watchdog, which would end this
    process once its stall timeout passed without progress."""
    yield
    while _OPEN_RUNS:
        _OPEN_RUNS.pop()._close()


def make_run(tmp_path, *overrides):
    cfg = config.build(TrainClassifierConfig, "debug", {
        "run_dir": str(tmp_path / "run"), "data.root": str(tmp_path), "tracking.enabled": "false",
        "batch.global_size": "8", "batch.micro_size": "4", **dict(o.split("=", 1) for o in overrides)})
    run = start_run(cfg)
    _OPEN_RUNS.append(run)
    return run


def data(epoch, skip):
    g = torch.Generator().manual_seed(epoch)
    batches = [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(8)]
    return iter(batches[skip:])


def fit(run, step_fn=None, *, ema=None, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEmaV3(model, decay=0.5) if ema else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = run.prepare(model, optimizer)

    def default_step(batch):
        x, y = batch
        return {"loss": torch.nn.functional.cross_entropy(model(x), y)}

    loop = TrainLoop(run, Phase("train", model, optimizer, step_fn(model) if step_fn else default_step), ema=ema)
    result = loop.fit(data, batches_per_epoch=8, num_epochs=0, max_steps=steps)
    return model, loop, result


def nan_at(micro_batch: int):
    calls = []

    def factory(model):
        def step(batch):
            calls.append(1)
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            return {"loss": loss * math.nan if len(calls) == micro_batch else loss}
        return step

    return factory


def test_nonfinite_stop_names_the_step_and_the_fix(tmp_path):
    run = make_run(tmp_path, "runtime.nonfinite=stop")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss.*step 1, epoch 0, micro-batch 2.*nonfinite=skip"):
        fit(run, nan_at(3))


def test_nonfinite_skip_drops_the_whole_optimizer_step(tmp_path):
    run = make_run(tmp_path, "runtime.nonfinite=skip")
    weights = []  # the weights each micro-batch saw
    bad = nan_at(3)

    def factory(model):
        inner = bad(model)
        return lambda batch: (weights.append(model.weight.detach().clone()), inner(batch))[1]

    model, loop, result = fit(run, factory, steps=3)
    assert result["skipped_steps"] == 1 and loop.state.step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # windows are micro-batches (0,1) (2,3) (4,5); the NaN was in the 2nd: no update between
    # the 2nd and the 3rd window, although the 2nd window's good micro-batch had a gradient
    assert not torch.equal(weights[0], weights[2])
    assert torch.equal(weights[2], weights[4])
    assert not torch.equal(weights[4], model.weight)


def test_too_many_skipped_steps_in_a_row_stop(tmp_path):
    run = make_run(tmp_path, "runtime.nonfinite=skip", "runtime.max_skipped_steps=1")

    def always_nan(model):
        return lambda batch: {"loss": model(batch[0]).sum() * math.nan}

    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        fit(run, always_nan)


def test_ema_tracks_the_weights_and_is_checkpointed(tmp_path):
    run = make_run(tmp_path, "runtime.ema_decay=0.5")
    model, loop, _ = fit(run, ema=True)
    assert not torch.equal(loop.ema.module.weight, model.weight)
    assert complete_checkpoints(run.run_dir / "checkpoints")


def test_accumulation_keeps_the_global_batch(tmp_path):
    """global 8 = micro 4 x 2 accumulation steps: 4 optimizer steps take 8 micro-batches."""
    run = make_run(tmp_path)
    assert run.grad_accum_steps == 2
    _, loop, _ = fit(run)
    assert loop.state.step == 4 and loop.state.batch_in_epoch == 0 and loop.state.epoch == 1
    assert loop.state.samples == 32


def test_a_frozen_network_is_whole_in_eval_mode_and_never_trained(tmp_path):
    """Run.frozen: on the device, eval mode, no gradients, not wrapped; the loop never flips it to
    train mode (BatchNorm keeps its running statistics) nor changes a weight."""
    run = make_run(tmp_path)
    torch.manual_seed(0)
    features = run.frozen(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    before = {k: v.clone() for k, v in features.state_dict().items()}
    assert type(features) is torch.nn.Sequential and not features.training
    assert all(not p.requires_grad and p.dtype == torch.float32 and p.device == run.device
               for p in features.parameters())

    def through_features(model):
        return lambda batch: {"loss": torch.nn.functional.cross_entropy(model(features(batch[0])), batch[1])}

    _, loop, _ = fit(run, through_features)
    assert loop.state.step == 4 and not features.training
    assert all(torch.equal(v, before[k]) for k, v in features.state_dict().items())
    run.cfg.runtime.precision = "bf16"  # the compute precision (this process's accelerator stays fp32)
    assert all(p.dtype == torch.bfloat16 for p in run.frozen(torch.nn.Linear(3, 3)).parameters())


def test_own_states_round_trip_without_pickle(tmp_path):
    from disttrain.runtime.statefile import load_state, save_state

    state = {"state": {0: {"momentum_buffer": torch.arange(3.0), "step": torch.tensor(4.0)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.999), "nan": math.nan}],
             "counters": {"step": 7, "done": False, "name": None}}
    save_state(tmp_path / "opt", state)
    back = load_state(tmp_path / "opt")
    assert torch.equal(back["state"][0]["momentum_buffer"], torch.arange(3.0))
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and math.isnan(back["param_groups"][0]["nan"])
    assert back["counters"] == state["counters"] and list(back["state"]) == [0]
    with pytest.raises(TypeError, match="without pickling"):
        save_state(tmp_path / "bad", {"fn": print})


def test_a_planted_pickle_is_never_unpickled_even_with_a_forged_checksum(tmp_path):
    """The checkpoint's own listing is forged to include a planted custom_checkpoint_0.pkl: accelerate
    refuses to load custom states nobody registered, and nothing of ours reads pickles."""
    import json
    import pickle

    from disttrain import files
    from disttrain.runtime.checkpoint import META, _sha256

    run = make_run(tmp_path, "checkpoint.every_steps=2")
    fit(run, steps=2)
    ckpt = complete_checkpoints(run.run_dir / "checkpoints")[-1]
    run.finish({}, step=2)
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = ckpt / "custom_checkpoint_0.pkl"
    planted.write_bytes(pickle.dumps(Planted()))
    meta = json.loads((ckpt / META).read_text())
    meta["files"][planted.name] = {"size": planted.stat().st_size, "sha256": _sha256(planted)}
    files.write_json(ckpt / META, meta)

    resumed = make_run(tmp_path, "checkpoint.every_steps=2")
    assert resumed.resume_from == ckpt  # the forged listing verifies...
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl, which disttrain never writes"):
        fit(resumed, steps=4)  # ...but the pickle is refused, not run
    assert not marker.exists()
