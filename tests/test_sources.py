"""Evaluation set specs: datasets in their own layout, folders, generated noise and D.3 synthetic outliers."""

from __future__ import annotations

import io
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


def test_damaged_images_are_skipped_counted_and_do_not_stop_an_evaluation(tmp_path, capfd):
    """Found by a user: one unreadable image in an evaluation set ended a training run."""
    from PIL import Image

    from disttrain.data.shards import ShardSplitWriter

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(9):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.png").write_bytes(b"\x89PNG garbage")  # the first image: open_source must not test-read it
    (folder / "9.jpg").symlink_to(tmp_path / "gone.jpg")  # listed, but its bytes cannot be read
    writer = ShardSplitWriter(tmp_path / "split", samples_per_shard=4, classes=["a"])
    for i in range(9):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(buf, format="PNG")
        writer.write(f"k{i}", b"not an image" if i == 3 else buf.getvalue(), "png", 0, {})
    writer.close()

    for spec, size, damaged, counts in [(folder, 10, {0, 9}, {"corrupt_samples": 1, "unreadable_samples": 1}),
                                        (tmp_path / "split", 9, {3}, {"corrupt_samples": 1, "unreadable_samples": 0})]:
        source = open_source(str(spec), image_size=8)
        assert source.num_samples == size
        total = {}
        for rank in range(2):
            got = everything_of(source, rank, world=2, workers=2)
            assert all(i % 2 == rank for i in got)
            for key, value in source.problems().items():  # the counts of this rank's pass
                total[key] = total.get(key, 0) + value
            total.setdefault("indices", []).extend(got)
        assert sorted(total.pop("indices")) == sorted(set(range(source.num_samples)) - damaged)
        assert total == {"served_samples": source.num_samples - len(damaged), **counts}
    assert "disttrain: warning: skipped" in capfd.readouterr().err  # from the loader's worker processes
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images"):
        open_source(str(empty), image_size=8)


def everything_of(source, rank, world, workers):
    return [int(i) for _, _, index in source.loader(to_tensor, batch_size=3, rank=rank, world_size=world,
                                                    num_workers=workers) for i in index]


def test_problems_count_the_latest_pass(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"broken")
    source = open_source(str(tmp_path), image_size=8)
    loader = source.loader(to_tensor, batch_size=2, rank=0, world_size=1, num_workers=1)
    for _ in range(2):  # the same loader twice, as an evaluation every epoch does
        assert sum(len(b[2]) for b in loader) == 4
        assert source.problems() == {"served_samples": 4, "corrupt_samples": 1, "unreadable_samples": 0}
