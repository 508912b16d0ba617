"""Shard reader: per-rank epochs of equal length, exact resume, complete evaluation coverage."""

from __future__ import annotations

import itertools

import pytest
import torch

from disttrain.data.shards import DataError, ShardReader, ShardSplit, ShardSplitWriter
from disttrain.data.sources import open_source


def to_tensor(img):
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32) + torch.rand(1)  # random part: seeded per sample


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ShardSplit:
    """53 samples over shards of 5 (the last one short), labels = sample index."""
    import io

    from PIL import Image

    root = tmp_path_factory.mktemp("split")
    writer = ShardSplitWriter(root, samples_per_shard=5, classes=[str(i) for i in range(53)])
    for i in range(53):
        buf = io.BytesIO()
        Image.new("RGB", (2, 2), (i, 0, 0)).save(buf, format="PNG")
        writer.write(f"s{i:04d}", buf.getvalue(), "png", i, {"i": i})
    writer.close()
    return ShardSplit.open(root)


def reader(split, rank=0, world=1, workers=0, batch=3) -> ShardReader:
    return ShardReader(split, to_tensor, batch_size=batch, rank=rank, world_size=world, num_workers=workers, seed=7,
                       shuffle_buffer=8)


def labels(loader, limit=None):
    return [batch[1].tolist() for batch in itertools.islice(loader, limit)]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_at_any_batch_replays_the_same_sequence(split, workers):
    r = reader(split, rank=1, world=2, workers=workers)
    n = r.batches_per_epoch
    full = labels(r.loader(epoch=3), n)
    assert len(full) == n
    values = [(b, x) for b in range(n) for x in full[b]]
    assert len({x for _, x in values}) == len(values)  # nothing twice within an epoch
    for skip in range(n):
        assert labels(r.loader(epoch=3, skip_batches=skip), n - skip) == full[skip:]


def test_augmentation_randomness_is_seeded_per_sample(split):
    r = reader(split, workers=2)
    a = [b[0] for b in itertools.islice(r.loader(epoch=0), 4)]
    b = [b[0] for b in itertools.islice(r.loader(epoch=0, skip_batches=2), 2)]
    assert torch.equal(torch.cat(a[2:]), torch.cat(b))


def test_ranks_read_disjoint_shards_and_equal_batch_counts(split):
    for epoch in range(3):
        seen = []
        for rank in range(2):
            r = reader(split, rank=rank, world=2, workers=2)
            batches = labels(r.loader(epoch), r.batches_per_epoch)
            assert len(batches) == r.batches_per_epoch == reader(split, 1 - rank, 2, 2).batches_per_epoch
            seen.append({x for b in batches for x in b})
        assert not seen[0] & seen[1]
    orders = [labels(reader(split).loader(e), 5) for e in range(2)]
    assert orders[0] != orders[1]  # epochs are reshuffled


def test_too_few_shards_for_the_readers_is_a_clear_error(split):
    with pytest.raises(DataError, match=r"11 shards, fewer than world size 4 x data.num_workers=3 = 12"):
        reader(split, world=4, workers=3)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1), (4, 2)])
def test_eval_loader_covers_every_sample_once(split, world, workers):
    source = open_source(str(split.root), image_size=2)
    got = []
    for rank in range(world):
        batches = list(source.loader(to_tensor, batch_size=4, rank=rank, world_size=world, num_workers=workers))
        assert len(batches) <= source.most_batches(4, world, workers)
        got += [i for b in batches for i in b[2].tolist()]
    assert sorted(got) == list(range(53))


def test_missing_shard_is_named(split, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split.root, copy)
    (copy / "000004.tar").unlink()
    with pytest.raises(DataError, match="000004.tar"):
        ShardSplit.open(copy)
