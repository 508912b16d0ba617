"""`disttrain demo-data`: deterministic, complete, and in the shard format every stage reads."""

from __future__ import annotations

import hashlib
import json
import subprocess

from disttrain.data.demo import NUM_ID_CLASSES, POOL_SIZES, SPLIT_SIZES, SPECIES
from disttrain.data.shards import ShardSplit, decode_image
from tests.conftest import VENV_BIN


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_is_deterministic_and_matches_the_manifest(tmp_path, demo_root):
    out = tmp_path / "again"
    proc = subprocess.run([str(VENV_BIN / "disttrain"), "demo-data", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train 2000" in proc.stdout
    assert digest(out) == digest(demo_root)  # byte-identical to the session's copy

    info = json.loads((demo_root / "demo.json").read_text())
    assert len(info["id_classes"]) == NUM_ID_CLASSES and len(info["holdout_classes"]) == len(SPECIES) - NUM_ID_CLASSES
    assert not set(info["id_classes"]) & set(info["holdout_classes"])
    for name, per_class in SPLIT_SIZES.items():
        split = ShardSplit.open(demo_root / name)
        manifest = json.loads((demo_root / name / "manifest.json").read_text())
        assert split.num_samples == per_class * split.num_classes
        assert manifest["class_counts"] == [per_class] * split.num_classes
    for name, size in POOL_SIZES.items():
        assert ShardSplit.open(demo_root / name).num_samples == size


def test_shards_hold_decodable_jpegs_with_labels_and_metadata(demo_root):
    import webdataset as wds

    split = ShardSplit.open(demo_root / "holdout")
    sample = next(iter(wds.tarfile_to_samples()([{"url": str(split.root / split.shard_names[0])}])))
    assert set(sample) >= {"__key__", "jpg", "cls", "json"}
    assert decode_image(sample).size == (32, 32)
    meta = json.loads(sample["json"])
    assert meta["class_name"] == split.classes[int(sample["cls"])]


def test_classes_differ_in_detail_not_in_global_colour(demo_root):
    """Not trivial: the mean colour of an image says little about its class."""
    import numpy as np
    import webdataset as wds

    split = ShardSplit.open(demo_root / "train")
    means, labels = [], []
    for name in split.shard_names[:6]:
        for sample in wds.tarfile_to_samples()([{"url": str(split.root / name)}]):
            means.append(np.asarray(decode_image(sample), dtype=np.float32).mean(axis=(0, 1)))
            labels.append(int(sample["cls"]))
    means, labels = np.stack(means), np.array(labels)
    centroids = np.stack([means[labels == c].mean(0) for c in range(split.num_classes)])
    nearest = np.argmin(((means[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() < 0.35  # nearest-centroid on colour is far from solving it
