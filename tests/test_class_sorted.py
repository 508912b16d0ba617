"""Data that looks like real data: a class-sorted image folder, converted in its own order into a
single shard, must train as well as a shuffled conversion -- no rank and no batch is dealt a
class-skewed slice, whatever order the shards hold the samples in."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disttrain import cli
from disttrain.data.shards import ShardSplit, iter_samples
from disttrain.data.stream import ShardReader

NUM_CLASSES, PER_CLASS, BATCH = 10, 24, 8


def sample_id(img: Image.Image) -> torch.Tensor:
    """The id a fixture image carries in its pixel (red + 256 x green)."""
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor(r + 256 * g)


@pytest.fixture(scope="module")
def sorted_split(tmp_path_factory) -> ShardSplit:
    """`disttrain shards build imagefolder --keep-order` of a class-sorted folder: one shard, class by class."""
    root = tmp_path_factory.mktemp("sorted")
    for c in range(NUM_CLASSES):
        (root / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            n = c * PER_CLASS + i
            Image.new("RGB", (4, 4), (n % 256, n // 256, 0)).save(root / "folder" / f"class{c}" / f"{i:03d}.png")
    cli.main(["shards", "build", "imagefolder", str(root / "folder"), str(root / "split"), "--keep-order",
              "--samples-per-shard", "1000"])
    split = ShardSplit.open(root / "split")
    assert len(split.shard_names) == 1 and split.manifest["options"]["shuffle_seed"] is None
    labels = [int(s["cls"]) for s in iter_samples(split)]
    assert labels == sorted(labels)  # the shard is sorted by class, as the user's was
    return split


def readers(split: ShardSplit, world: int, workers: int, batch: int = BATCH) -> list[ShardReader]:
    return [ShardReader(split, sample_id, batch_size=batch, rank=r, world_size=world, num_workers=workers, seed=5)
            for r in range(world)]


def epoch(reader: ShardReader, e: int, skip: int = 0) -> list[list[int]]:
    return [b[0].tolist() for b in reader.loader(e, skip_batches=skip)]


def class_of(sample: int) -> int:
    return sample // PER_CLASS


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)])
def test_every_rank_and_batch_is_class_mixed(sorted_split, world, workers):
    seen = []
    for r in readers(sorted_split, world, workers):
        batches = epoch(r, 0)
        assert len(batches) == r.batches_per_epoch == NUM_CLASSES * PER_CLASS // (world * BATCH)
        ids = [x for b in batches for x in b]
        counts = np.bincount([class_of(x) for x in ids], minlength=NUM_CLASSES)
        expected = len(ids) / NUM_CLASSES
        assert counts.min() >= 0.4 * expected and counts.max() <= 1.7 * expected, counts  # all, in fair shares
        # a uniform shuffle puts about 5.8 distinct classes into a batch of 8 drawn from 10 balanced ones
        # (a class-sorted stream 1 or 2)
        distinct = np.mean([len({class_of(x) for x in b}) for b in batches])
        assert distinct >= 5.0, distinct
        seen += ids
    assert len(seen) == len(set(seen)) == (NUM_CLASSES * PER_CLASS // (world * BATCH)) * world * BATCH


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_and_new_order_every_epoch(sorted_split, workers):
    r = readers(sorted_split, 2, workers)[1]
    full = epoch(r, 3)
    for skip in (1, 4, len(full) - 1):
        assert epoch(r, 3, skip) == full[skip:]
    assert epoch(r, 4) != full and sorted(x for b in epoch(r, 4) for x in b) != sorted(x for b in full for x in b)
    assert not np.array_equal(r.epoch_order(3), r.epoch_order(4))


def test_a_source_order_split_is_named_once(sorted_split, capsys):
    readers(sorted_split, 2, 0)
    err = capsys.readouterr().err
    assert err.count("was written in source order") == 1 and "class-mixed" in err


# --------------------------------------------------------------------------- end to end (the user's report)


def class_sorted_folder(demo_root: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` demo training images of every class as <out>/<NN_class>/<n>.jpg, the way
    real datasets arrive (NN: folders sort into the demo's class order, which its test split's labels use)."""
    split = ShardSplit.open(demo_root / "train")
    taken = [0] * split.num_classes
    for sample in iter_samples(split):
        label = int(sample["cls"])
        if taken[label] < per_class:
            folder = out / f"{label:02d}_{split.classes[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{taken[label]:04d}.jpg").write_bytes(sample["jpg"])
            taken[label] += 1
    assert taken == [per_class] * split.num_classes
    return out


def data_root(demo_root: Path, folder: Path, out: Path, *options: str) -> Path:
    """`disttrain shards build imagefolder` of the folder as <out>/train, the demo test split beside it."""
    cli.main(["shards", "build", "imagefolder", str(folder), str(out / "train"), *options])
    os.symlink(demo_root / "test", out / "test")
    return out


# 100 steps of batch 32 (micro-batches of 16 on every rank), Adam: well above chance on the demo's
# test split in about 30 s of training on 2 CPU cores
TRAIN = ["--preset", "debug", "data.image_size=16", "batch.global_size=32", "batch.micro_size=16",
         "optim.name=adam", "optim.lr=0.002", "optim.weight_decay=0", "train.max_steps=0", "train.num_epochs=4",
         "runtime.eval_every=100", "runtime.log_every=25"]


@pytest.mark.slow
def test_a_class_sorted_single_shard_conversion_trains_as_well_as_a_shuffled_one(launch, demo_root, tmp_path):
    """The user's report: a class-sorted folder converted in its order into one shard fell from 0.98
    to 0.55 accuracy on 2 processes, silently. (The reader before the sample-level permutation
    reached about 0.12 here, the shuffled conversion about 0.35.)"""
    folder = class_sorted_folder(demo_root, tmp_path / "folder", per_class=80)
    roots = {"shuffled": data_root(demo_root, folder, tmp_path / "shuffled", "--samples-per-shard", "100"),
             "keep-order": data_root(demo_root, folder, tmp_path / "kept", "--keep-order", "--samples-per-shard",
                                     "100000")}
    manifest = json.loads((roots["keep-order"] / "train" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and manifest["options"]["shuffle_seed"] is None
    accuracy = {}
    for (name, root), nproc in itertools.product(roots.items(), (1, 2)):
        run = launch("train_classifier.py", *TRAIN, f"data.root={root}", run_dir=tmp_path / f"run-{name}-{nproc}",
                     nproc=nproc)
        assert run.returncode == 0, run.output[-3000:]
        accuracy[name, nproc] = run.status()["eval/acc1"]
    print(accuracy)
    for nproc in (1, 2):
        assert accuracy["keep-order", nproc] >= 0.2, accuracy  # chance is 0.1
        assert accuracy["keep-order", nproc] >= accuracy["shuffled", nproc] - 0.12, accuracy
