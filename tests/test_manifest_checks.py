"""The manifest is checked, not trusted: wrong counts, sizes and checksums, a broken manifest, and
damaged samples past a threshold are reported or stop a run, clearly and before any compute."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from disttrain.data.shards import MANIFEST, DataError, ShardSplit, make_sample, write_manifest, write_shard
from disttrain.data.stream import ShardReader, check_damage

SHARD_SIZES = [150, 100, 100, 50]  # 400 samples


def sample_id(img: Image.Image) -> torch.Tensor:
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor(r + 256 * g)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """4 shards of SHARD_SIZES samples; sample n carries its number in its pixel."""
    root = tmp_path_factory.mktemp("pristine") / "split"
    root.mkdir()
    entries, n = [], 0
    for index, size in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(size):
            buf = io.BytesIO()
            Image.new("RGB", (2, 2), (n % 256, n // 256, 0)).save(buf, format="PNG")
            samples.append(make_sample(f"s{n:05d}", buf.getvalue(), "png", n % 2, {}))
            n += 1
        entries.append(write_shard(root, index, samples))
    write_manifest(root, ["a", "b"], entries, [200, 200])
    return root


@pytest.fixture
def split_dir(pristine, tmp_path) -> Path:
    copy = tmp_path / "split"
    shutil.copytree(pristine, copy)
    return copy


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def served_ids(split: ShardSplit, world: int = 2, batch: int = 8, **kwargs) -> list[int]:
    ids = []
    for rank in range(world):
        r = ShardReader(split, sample_id, batch_size=batch, rank=rank, world_size=world, num_workers=0, seed=1,
                        **kwargs)
        ids += [x for b in r.loader(0) for x in b[0].tolist()]
    return ids


@pytest.mark.parametrize("with_indexes", [True, False], ids=["sidecar-indexes", "scanned-headers"])
def test_wrong_counts_are_reported_and_every_real_sample_is_read_once(split_dir, capsys, with_indexes):
    def wrong_counts(manifest):
        manifest["shards"][0]["num_samples"] = 50  # holds 150: 100 unlisted
        manifest["shards"][1]["num_samples"] = 150  # holds 100: 50 missing
        manifest["num_samples"] = 350
        if not with_indexes:  # an older manifest: no sizes, no indexes
            for entry in manifest["shards"]:
                del entry["index"], entry["size"]

    edit_manifest(split_dir, wrong_counts)
    if not with_indexes:
        for sidecar in split_dir.glob("*.idx.npy"):
            sidecar.unlink()
    split = ShardSplit.open(split_dir)
    reader = ShardReader(split, sample_id, batch_size=8, rank=0, world_size=1, num_workers=0, seed=1)
    assert reader.manifest_report == {"listed_samples": 350, "actual_samples": 400, "missing_samples": 50,
                                      "unlisted_samples": 100}
    err = capsys.readouterr().err
    assert err.count("the manifest lists 350") == 1  # one line per split, however many readers
    assert "000000.tar lists 50, holds 150" in err and "000001.tar lists 150, holds 100" in err
    assert ("read the tar headers of 4 of 4 shards" in err) != with_indexes
    ids = served_ids(split)
    assert sorted(ids) == list(range(400))  # nothing skipped, nothing twice
    with pytest.raises(DataError, match=r"50 of the 350 samples its manifest lists are not in the shards.*"
                                        r"max_bad_fraction=0.1"):
        ShardReader(split, sample_id, batch_size=8, rank=0, world_size=1, num_workers=0, seed=1,
                    max_bad_fraction=0.1)


def test_a_wrong_checksum_is_caught_when_asked(split_dir):
    edit_manifest(split_dir, lambda m: m["shards"][2].update(sha256="0" * 64))
    ShardSplit.open(split_dir)  # cheap by default: sizes only
    with pytest.raises(DataError, match=r"sha256 of 1 shards differs from the manifest \(000002.tar\)"):
        ShardSplit.open(split_dir, verify_checksums=True)


def test_a_shard_cut_short_is_reported_and_the_quota_still_filled(split_dir, capsys):
    shard = split_dir / "000001.tar"
    shard.write_bytes(shard.read_bytes()[: 40 * 6144 + 3000])  # 40 whole samples, then part of one
    split = ShardSplit.open(split_dir)
    err = capsys.readouterr().err
    assert "1 shards differ in size from the manifest" in err and "000001.tar" in err
    ids = served_ids(split, world=2, batch=8)
    report = split.index.report
    assert report["missing_samples"] == 59 and report["actual_samples"] == 341  # 40 and the part of one
    assert len(ids) == len(set(ids)) == (341 // 16) * 16  # full batches on both ranks, nothing twice
    assert not set(ids) & set(range(191, 250))  # what was cut off is never served
    assert "cut short" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"classes": ["a"]}), "`shards` is missing"),
    (json.dumps({"shards": [{"name": "000000.tar"}], "classes": ["a"]}), "has no `num_samples` count"),
    (json.dumps({"shards": [{"name": "000000.tar", "num_samples": "150"}], "classes": ["a"]}),
     "has no `num_samples` count"),
    (json.dumps({"shards": [], "classes": "ab"}), "`classes` is not a list"),
    (json.dumps([1, 2]), "not a JSON object"),
])
def test_a_broken_manifest_is_one_clear_error(split_dir, content, problem):
    (split_dir / MANIFEST).write_text(content)
    with pytest.raises(DataError) as info:
        ShardSplit.open(split_dir)
    message = str(info.value)
    assert problem in message and str(split_dir / MANIFEST) in message and "disttrain shards build" in message
    assert "\n" not in message


def test_check_damage_stops_past_the_threshold_only(split_dir):
    def counts(served, corrupt, unreadable=0):
        return {"served_samples": served, "corrupt_samples": corrupt, "unreadable_samples": unreadable}

    check_damage(counts(0, 1), 0.01, "x")  # one early bad sample: not yet
    check_damage(counts(5000, 40, 10), 0.01, "x")  # 1 % exactly: allowed
    check_damage(counts(500, 10), 0.01, "x")  # 10 bad of the first 1000: allowed
    with pytest.raises(DataError, match=r"outliers: 11 of the 511 samples read so far are damaged \(11 do not "
                                        r"decode, 0 cannot be read\).*data.max_bad_fraction=0.01.*"
                                        r"disttrain shards verify <split>"):
        check_damage(counts(500, 11), 0.01, "outliers")
    with pytest.raises(DataError, match=f"disttrain shards verify {split_dir}`"):
        check_damage(counts(5000, 30, 30), 0.01, str(split_dir))
    with pytest.raises(DataError, match="max_bad_fraction=0 "):
        check_damage(counts(10, 0, 1), 0.0, "x")
    check_damage(counts(10, 0, 0), 0.0, "x")


# --------------------------------------------------------------------------- through the recipe


def test_a_broken_manifest_stops_training_with_one_line(launch, demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "train", root / "train")
    (root / "test").symlink_to(demo_root / "test")
    (root / "train" / MANIFEST).write_text((root / "train" / MANIFEST).read_text()[:-40])  # cut short
    run = launch("train_classifier.py", "--preset", "debug", f"data.root={root}", nproc=1, timeout=300)
    assert run.returncode == 2, run.output[-3000:]
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "manifest.json is not valid JSON" in last, run.output[-3000:]
    assert "Traceback" not in run.output and not (run.run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_a_damaged_evaluation_image_does_not_end_a_run(launch, demo_root, tmp_path):
    """Found by a user: one unreadable image in the evaluation set ended a whole training run."""
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    (root / "train").symlink_to(demo_root / "train")
    for i in range(20):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(root / "test" / f"{i:03d}.png")
    (root / "test" / "005.png").write_bytes(b"GIF89a not really")
    run = launch("train_classifier.py", "--preset", "debug", f"data.root={root}", "train.max_steps=2", nproc=1,
                 timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    assert run.status()["state"] == "finished" and "005.png" in run.output
