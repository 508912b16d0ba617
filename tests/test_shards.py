"""Shard streams: exact per-rank epochs, the resampled outlier stream, resume, damaged data, evaluation coverage."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from disttrain.data.shards import DataError, ShardSplit, ShardSplitWriter
from disttrain.data.stream import PROBLEMS, OutlierStream, ShardReader
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
    return ShardReader(split, to_tensor, batch_size=batch, rank=rank, world_size=world, num_workers=workers, seed=7)


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


@pytest.mark.parametrize("world, workers, batch", [(2, 2, 3), (3, 1, 4), (1, 3, 5), (4, 2, 2)])
def test_ranks_and_workers_read_disjoint_complete_epochs(split, world, workers, batch):
    """Every rank gets exactly N // (world x batch) batches; together they hold every sample once
    but the fewer than world x batch left over, and the leftovers change with the epoch."""
    left_out = []
    for epoch in range(3):
        seen = []
        for rank in range(world):
            r = reader(split, rank=rank, world=world, workers=workers, batch=batch)
            assert r.batches_per_epoch == 53 // (world * batch)
            batches = labels(r.loader(epoch))  # the loader ends by itself, after exactly that many
            assert len(batches) == r.batches_per_epoch and all(len(b) == batch for b in batches)
            seen += [x for b in batches for x in b]
        assert len(seen) == len(set(seen)) == r.batches_per_epoch * world * batch
        left_out.append(set(range(53)) - set(seen))
    assert len({frozenset(s) for s in left_out}) > 1 or not left_out[0]
    orders = [labels(reader(split).loader(e), 5) for e in range(2)]
    assert orders[0] != orders[1]  # epochs are reshuffled


def test_an_epoch_smaller_than_one_global_batch_is_a_clear_error(split):
    with pytest.raises(DataError, match=r"53 samples, fewer than one global batch of 4 ranks x 16"):
        reader(split, world=4, batch=16)


def outliers(split, rank=0, world=2, workers=2, batches=7) -> OutlierStream:
    return OutlierStream(split, to_tensor, batch_size=4, batches_per_epoch=batches, rank=rank, world_size=world,
                         num_workers=workers, seed=3)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_outlier_stream_length_is_per_rank_and_resumes(split, workers):
    streams = [outliers(split, rank=r, workers=workers) for r in range(2)]
    full = [labels(s.loader(epoch=1)) for s in streams]
    assert [len(f) for f in full] == [7, 7]  # the user's number, per rank, whatever the worker count
    assert full[0] != full[1] and full[0] != labels(streams[0].loader(epoch=2))
    for skip in (1, 4, 6):
        assert labels(streams[0].loader(epoch=1, skip_batches=skip)) == full[0][skip:]
    # resampled: more batches than the split holds, drawn from every part of it
    many = labels(outliers(split, world=1, workers=workers, batches=40).loader(0))
    assert len(many) == 40 and len({x for b in many for x in b}) > 45


def test_damaged_members_and_truncated_shards_are_skipped_counted_and_replaced(split, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(split.root, damaged)
    raw = (damaged / "000003.tar").read_bytes()
    (damaged / "000003.tar").write_bytes(raw[:2048])  # truncated: 5 samples listed, 1 left (its label only)
    writer = ShardSplitWriter(tmp_path / "bad", samples_per_shard=5, classes=["x"])
    writer.write("bad0", b"not an image", "png", 0, {})
    writer.close()
    shutil.copy(tmp_path / "bad" / "000000.tar", damaged / "000007.tar")  # 5 listed, 1 present, undecodable
    damaged_split = ShardSplit.open(damaged)
    err = capsys.readouterr().err
    assert "2 shards differ in size from the manifest" in err and "000003.tar" in err and "000007.tar" in err
    for world, workers in [(1, 0), (2, 2)]:
        readers = [reader(damaged_split, rank, world, workers) for rank in range(world)]
        assert readers[0].manifest_report == {"listed_samples": 53, "actual_samples": 45, "missing_samples": 8,
                                              "unlisted_samples": 0}
        served = []
        for epoch in range(3):
            for r in readers:
                batches = labels(r.loader(epoch=epoch))
                assert len(batches) == r.batches_per_epoch and all(len(b) == 3 for b in batches)
                served += [x for b in batches for x in b]
        problems = {k: sum(r.problems()[k] for r in readers) for k in PROBLEMS}
        assert problems["served_samples"] == len(served) and problems["unreadable_samples"] == 0
        assert problems["corrupt_samples"] >= 1  # the undecodable PNG and the sample cut down to its label
        assert not set(served) & {15, 16, 17, 18, 19, 35, 36, 37, 38, 39}  # cut off, never served
    assert "disttrain: warning: skipped" in capsys.readouterr().err
    (damaged / "000005.tar").unlink()
    with pytest.raises(DataError, match="000005.tar is missing"):
        labels(reader(damaged_split).loader(epoch=0))


def test_bytes_cut_after_start_are_unreadable_and_replaced(split, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split.root, copy)
    r = reader(ShardSplit.open(copy), world=1, workers=0, batch=5)  # indexed while whole
    (copy / "000010.tar").write_bytes((copy / "000010.tar").read_bytes()[:3000])  # then cut: 3 samples short
    batches = labels(r.loader(epoch=0))
    assert len(batches) == r.batches_per_epoch == 10 and all(len(b) == 5 for b in batches)
    assert r.problems()["unreadable_samples"] == 3 and r.problems()["served_samples"] == 50
    assert len({x for b in batches for x in b}) == 50


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


def test_indexes_are_found_next_to_shards_moved_into_folders(tmp_path, capsys):
    """recipes/synthesize.py writes each rank's shards into rank-NNN/ and renames the entries."""
    from PIL import Image

    from disttrain.data.shards import make_sample, write_manifest, write_shard

    entries = []
    for rank in range(2):
        (tmp_path / f"rank-{rank:03d}").mkdir()
        buf = io.BytesIO()
        Image.new("RGB", (2, 2)).save(buf, format="PNG")
        samples = [make_sample(f"r{rank}-{i}", buf.getvalue(), "png", -1, {}) for i in range(6)]
        entry = write_shard(tmp_path / f"rank-{rank:03d}", 0, samples)
        entries.append({**entry, "name": f"rank-{rank:03d}/{entry['name']}"})
    write_manifest(tmp_path, [], entries, [])
    split = ShardSplit.open(tmp_path)
    assert split.index.num_samples == 12 and "read the tar headers" not in capsys.readouterr().err
    stream = OutlierStream(split, lambda img: torch.zeros(1), batch_size=4, batches_per_epoch=3, rank=0, world_size=1,
                           num_workers=0, seed=0)
    assert [len(b[1]) for b in stream.loader(0)] == [4, 4, 4]


def test_labels_outside_the_classes_are_counted_not_served(tmp_path):
    """A label the split has no class for would fail the loss mid-run: it is a damaged sample."""
    from PIL import Image

    from disttrain.data.shards import make_sample, write_manifest, write_shard

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    samples = [make_sample(f"k{i}", buf.getvalue(), "png", 7 if i == 2 else i % 2, {}) for i in range(6)]
    write_manifest(tmp_path, ["a", "b"], [write_shard(tmp_path, 0, samples)], [3, 2])
    r = ShardReader(ShardSplit.open(tmp_path), lambda img: torch.zeros(1), batch_size=5, rank=0, world_size=1,
                    num_workers=0, seed=0)
    served = [x for b in r.loader(0) for x in b[1].tolist()]
    assert len(served) == 5 and set(served) <= {0, 1} and r.problems()["corrupt_samples"] == 1
