"""Evaluation set specs: datasets in their own layout, folders, generated noise and D.3 synthetic outliers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from disttrain.data.shards import DataError
from disttrain.data.sources import open_source
from disttrain.data.synthetic import make_outlier


def to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def everything(source, world=2, workers=2):
    """Every sample over `world` ranks, by index."""
    out = {}
    for rank in range(world):
        for images, labels, index in source.loader(to_tensor, batch_size=3, rank=rank, world_size=world,
                                                   num_workers=workers):
            out.update({int(i): (img, int(y)) for img, y, i in zip(images, labels, index)})
    return out


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 7)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_dataset_layout_spec_streams_its_split_once_over_ranks(cifar):
    source = open_source(f"cifar10:{cifar}", image_size=32)  # the split defaults to test
    assert source.name == "cifar10-test" and source.num_samples == 7 and source.classes[0] == "c0"
    got = everything(source)
    assert sorted(got) == list(range(7)) and [got[i][1] for i in range(7)] == list(range(7))
    raw = pickle.loads((cifar / "test_batch").read_bytes())[b"data"][3].reshape(3, 32, 32)
    assert torch.equal(got[3][0], torch.from_numpy(raw))
    assert open_source(f"cifar10:{cifar}:train", 32).num_samples == 10
    with pytest.raises(DataError, match="no split 'val'"):
        open_source(f"cifar10:{cifar}:val", 32)


def test_synthetic_validation_outliers_by_spec(tmp_path):
    noise = open_source("synthetic:rademacher:10", image_size=8)
    got = everything(noise, world=3, workers=1)
    assert sorted(got) == list(range(10))
    assert torch.equal(got[4][0], torch.from_numpy(make_outlier("rademacher", 4, 8)).permute(2, 0, 1))
    from PIL import Image

    folder = tmp_path / "id"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 10, 200)).save(folder / f"{i}.png")
    inverted = everything(open_source(f"synthetic:invert:6:{folder}", image_size=8))
    assert sorted(inverted) == list(range(6))
    assert all(set(img[1].unique().tolist()) == {245} for img, _ in inverted.values())  # 255 - 10
    with pytest.raises(DataError, match="corrupts ID images"):
        open_source("synthetic:pixelate:5", 8)
    with pytest.raises(DataError, match="rademacher"):
        open_source("synthetic:sparkles", 8)


def test_pixel_space_interpolations_mix_id_image_i_with_ood_image_i_mod_n(demo_root):
    from disttrain.data.sources import interpolated_source

    def as_float(img):
        return to_tensor(img).double()

    id_set, ood_set = open_source(str(demo_root / "test"), 32), open_source("noise:uniform:7", 32)
    mixed = interpolated_source(id_set, ood_set, 0.7, count=20)
    assert mixed.name == "interp-0.7" and mixed.num_samples == 20
    got = {}
    for rank in range(2):
        for images, labels, index in mixed.loader(as_float, batch_size=3, rank=rank, world_size=2, num_workers=2):
            got.update({int(i): img for img, i in zip(images, index)})
    assert sorted(got) == list(range(20))
    id_images = {i: as_float(img) for i, img in id_set.images(set(range(20))).items()}
    ood_images = {i: as_float(img) for i, img in ood_set.images(set(range(7))).items()}
    for i in (0, 6, 7, 19):
        assert torch.allclose(got[i], 0.7 * id_images[i] + 0.3 * ood_images[i % 7])
    with pytest.raises(DataError, match="outside"):
        interpolated_source(id_set, ood_set, 1.5)
