"""`disttrain shards build / verify`: round trip, resumable and idempotent writing, damaged input and shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from disttrain import cli
from disttrain.data import sharding
from disttrain.data.layouts import read_layout
from disttrain.data.shards import DataError, ShardSplit
from disttrain.data.sharding import ShardingOptions, build_split, verify_split


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder of 3 classes, 23 images: JPEGs and PNGs, one name with dots and spaces."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(23):
        cls = ["ant", "bee", "cat"][i % 3]
        (root / cls).mkdir(exist_ok=True)
        ext, fmt = ("jpg", "JPEG") if i % 2 else ("png", "PNG")
        name = f"img {i}.v2.{ext}" if i == 5 else f"{i:03d}.{ext}"
        Image.new("RGB", (6 + i, 5), (i * 10, 255 - i * 10, i)).save(root / cls / name, format=fmt)
    return root


def members(split_dir):
    """{source path: (key, image bytes, cls, json)} over every shard of a split."""
    out = {}
    for entry in json.loads((split_dir / "manifest.json").read_text())["shards"]:
        with tarfile.open(split_dir / entry["name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in files:
            key, _, ext = name.partition(".")
            if ext in ("jpg", "png"):
                meta = json.loads(files[f"{key}.json"])
                out[meta["source"]] = (key, files[name], int(files[f"{key}.cls"]), meta)
    return out


def build(*argv):
    cli.main(["shards", "build", *map(str, argv)])


def test_round_trip_keeps_every_sample_and_its_bytes(image_folder, tmp_path, capsys):
    build("imagefolder", image_folder, tmp_path / "split", "--samples-per-shard", 5, "--shuffle-seed", 1)
    assert "23 samples of 3 classes in 5 shards" in capsys.readouterr().out
    split = ShardSplit.open(tmp_path / "split")
    assert split.classes == ["ant", "bee", "cat"] and split.shard_sizes == [5, 5, 5, 5, 3]
    assert split.manifest["class_counts"] == [8, 8, 7] and split.manifest["source"]["layout"] == "imagefolder"
    got = members(tmp_path / "split")
    listing = read_layout("imagefolder", image_folder, "all")
    assert len(got) == 23
    for record in listing.records:
        key, data, cls, meta = got[record.meta["source"]]
        assert data == (image_folder / record.meta["source"]).read_bytes()  # bytes kept as they are
        assert cls == record.label and meta["class"] == listing.classes[cls] and "." not in key.rpartition("/")[2]
    assert verify_split(tmp_path / "split")["problems"] == []
    # shuffled across shards, deterministically
    keys = [k for k, *_ in got.values()]
    assert members(tmp_path / "split") == got and keys != sorted(keys)


def shard_classes(split_dir):
    """The classes of each shard, in member order."""
    return [[int(files[name]) for name in sorted(files) if name.endswith(".cls")]
            for files in (shard_files(split_dir / e["name"])
                          for e in json.loads((split_dir / "manifest.json").read_text())["shards"])]


def shard_files(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_build_shuffles_by_default_and_keep_order_keeps_the_source_order(image_folder, tmp_path, capsys):
    """Real datasets arrive sorted by class: shards are written shuffled unless told otherwise."""
    build("imagefolder", image_folder, tmp_path / "mixed", "--samples-per-shard", 8)
    build("imagefolder", image_folder, tmp_path / "kept", "--samples-per-shard", 8, "--keep-order")
    mixed, kept = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("mixed", "kept"))
    assert mixed["options"]["shuffle_seed"] == 0 and kept["options"]["shuffle_seed"] is None
    assert [s["class_counts"] for s in kept["shards"]] == [[8, 0, 0], [0, 8, 0], [0, 0, 7]]
    assert all(sum(1 for n in s["class_counts"] if n) >= 2 for s in mixed["shards"])  # every shard class-mixed
    assert [sorted(c) for c in shard_classes(tmp_path / "kept")] == [[0] * 8, [1] * 8, [2] * 7]
    assert all(len(set(c)) >= 2 for c in shard_classes(tmp_path / "mixed"))
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mixed").glob("0*")}
    build("imagefolder", image_folder, tmp_path / "mixed", "--samples-per-shard", 8)  # the same conversion: done
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mixed").glob("0*")} == written
    build("imagefolder", image_folder, tmp_path / "seed5", "--samples-per-shard", 8, "--shuffle-seed", 5)
    assert shard_classes(tmp_path / "seed5") != shard_classes(tmp_path / "mixed")
    with pytest.raises(SystemExit):  # another seed is another conversion
        build("imagefolder", image_folder, tmp_path / "mixed", "--samples-per-shard", 8, "--shuffle-seed", 5)
    assert "holds shards of a different conversion" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build("imagefolder", image_folder, tmp_path / "x", "--keep-order", "--shuffle-seed", 5)


def test_shards_carry_their_sample_index_and_older_splits_get_one(image_folder, tmp_path, capsys):
    from disttrain.data.tarindex import index_name, scan_shard

    build("imagefolder", image_folder, tmp_path / "s", "--samples-per-shard", 10)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = tmp_path / "s" / entry["name"]
        assert entry["index"] == index_name(entry["name"]) and entry["size"] == path.stat().st_size
        index = np.load(tmp_path / "s" / entry["index"], allow_pickle=False)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert index["offset"][:-1].tolist() == [m.offset for m in members][::3]  # where each sample starts
        assert index["label"][:-1].tolist() == [int(tar_member(path, m)) for m in members if m.name.endswith("cls")]
    # an older split: no indexes, no sizes -- `disttrain shards index` writes them
    for entry in manifest["shards"]:
        (tmp_path / "s" / entry.pop("index")).unlink()
        del entry["size"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    ShardSplit.open(tmp_path / "s").index
    assert "read the tar headers of 3 of 3 shards" in capsys.readouterr().err
    cli.main(["shards", "index", str(tmp_path / "s")])
    assert "3 sample indexes written" in capsys.readouterr().out
    assert verify_split(tmp_path / "s")["problems"] == []
    ShardSplit.open(tmp_path / "s").index
    assert "read the tar headers" not in capsys.readouterr().err
    shutil.copy(tmp_path / "s" / "000000.idx.npy", tmp_path / "s" / "000001.idx.npy")  # a stale index
    assert verify_split(tmp_path / "s")["problems"] == [
        "000001.tar: its sample index 000001.idx.npy does not match the shard's headers"]
    assert scan_shard(tmp_path / "s" / "000001.tar").num_samples == 10


def tar_member(path, member):
    with tarfile.open(path) as tar:
        return tar.extractfile(member).read()


def test_interrupted_run_then_rerun_gives_the_same_shards(image_folder, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    build("imagefolder", image_folder, clean, "--samples-per-shard", 4)
    out = tmp_path / "out"
    real, calls = sharding._write_one, []

    def dies_on_the_fourth(index):
        calls.append(index)
        if len(calls) == 4:
            (out / f".{sharding.shard_name(index)}.tmp").write_bytes(b"half a shard")  # killed mid-write
            raise KeyboardInterrupt
        return real(index)

    monkeypatch.setattr(sharding, "_write_one", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        build("imagefolder", image_folder, out, "--samples-per-shard", 4)
    with pytest.raises(DataError, match="manifest.json is missing"):
        ShardSplit.open(out)  # no reader accepts the partial split
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.tar")}
    assert len(written) == 3
    monkeypatch.setattr(sharding, "_write_one", real)
    build("imagefolder", image_folder, out, "--samples-per-shard", 4)
    manifest, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
    assert manifest["shards"] == reference["shards"]  # same names, counts and sha256
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*.tar") if p.name in written} == written
    assert not list(out.glob(".*.tmp"))
    build("imagefolder", image_folder, out, "--samples-per-shard", 4)  # complete: a no-op
    with pytest.raises(SystemExit) as exit_info:
        build("imagefolder", image_folder, out, "--samples-per-shard", 5)
    assert exit_info.value.code == 2


def test_other_conversion_into_the_same_folder_is_refused(image_folder, tmp_path, capsys):
    build("imagefolder", image_folder, tmp_path / "s", "--samples-per-shard", 4)
    with pytest.raises(SystemExit):
        build("imagefolder", image_folder, tmp_path / "s", "--samples-per-shard", 4, "--exclude-ids", "bee")
    assert "holds shards of a different conversion" in capsys.readouterr().err


def test_parallel_workers_write_identical_shards(image_folder, tmp_path):
    one = build_split(read_layout("imagefolder", image_folder, "all"), tmp_path / "one",
                      ShardingOptions(samples_per_shard=3, workers=1), progress=False)
    three = build_split(read_layout("imagefolder", image_folder, "all"), tmp_path / "three",
                        ShardingOptions(samples_per_shard=3, workers=3), progress=False)
    assert one["shards"] == three["shards"] and len(one["shards"]) == 8


def test_byte_limit_and_resize(image_folder, tmp_path):
    listing = read_layout("imagefolder", image_folder, "all")
    biggest = max(p.stat().st_size for p in image_folder.rglob("*.*"))
    plan = sharding.plan_shards(listing, ShardingOptions(samples_per_shard=100, max_shard_bytes=2 * biggest))
    assert all(sum((image_folder / listing.records[i].meta["source"]).stat().st_size for i in shard) <= 2 * biggest
               for shard in plan) and sum(map(len, plan)) == 23
    build("imagefolder", image_folder, tmp_path / "small", "--resize", 3)
    for _, data, _, _ in members(tmp_path / "small").values():
        assert min(Image.open(io.BytesIO(data)).size) == 3


def test_class_filters_and_unreadable_sources(image_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken)
    (broken / "cat" / "002.png").write_bytes(b"not a png")
    data = (broken / "cat" / "011.jpg").read_bytes()
    (broken / "cat" / "011.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    build("imagefolder", broken, tmp_path / "s", "--exclude-ids", "bee")
    out = capsys.readouterr().out
    assert "kept 2 of 3 classes" in out and "2 unreadable sources skipped" in out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["classes"] == ["ant", "cat"] and manifest["class_counts"] == [8, 5]
    assert {s["source"] for s in manifest["skipped"]} == {"cat/002.png", "cat/011.jpg"}
    assert manifest["filter"]["excluded"][0]["id"] == "bee"
    for argv, message in [(["--exclude-ids", "wasp"], "wasp"),
                          (["--include-ids", "ant", "--exclude-ids", "ant"], "removes every class"),
                          (["--part", "id"], "--part needs --split-file")]:
        with pytest.raises(SystemExit):
            build("imagefolder", broken, tmp_path / "x", *argv)
        assert message in capsys.readouterr().err


def test_split_file_selects_the_id_and_ood_classes(image_folder, tmp_path):
    cli.main(["splits", "partition", "--known", "0,2", "--num-classes", "3", "--out", str(tmp_path / "split.json")])
    for part, classes in [("id", ["ant", "cat"]), ("ood", ["bee"])]:
        build("imagefolder", image_folder, tmp_path / part, "--split-file", tmp_path / "split.json", "--part", part)
        assert ShardSplit.open(tmp_path / part).classes == classes


def test_verify_finds_damaged_shards(image_folder, tmp_path, capsys):
    build("imagefolder", image_folder, tmp_path / "s", "--samples-per-shard", 10)
    shard = tmp_path / "s" / "000001.tar"
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    raw[member.offset_data + 20: member.offset_data + 40] = b"\0" * 20  # damage one PNG in place
    shard.write_bytes(bytes(raw))
    (tmp_path / "s" / "000002.tar").write_bytes(raw[:1536])  # and truncate another
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", "verify", str(tmp_path / "s")])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "000001.tar: sha256 differs" in out and "does not decode" in out
    assert "000002.tar" in out and "3 shards" in out


def test_webvision_outlier_pool_without_dogs_streams_per_rank(tmp_path, capsys):
    """mixupoe.txt 5.1: the Dog benchmark's outlier pool is WebVision minus every dog class
    (WordNet descendants of dog), sharded, then streamed as resampled outliers."""
    from disttrain.data.stream import OutlierStream

    root = tmp_path / "webvision"
    synsets = {"n02085620": "Chihuahua", "n02099601": "golden retriever", "n02119789": "kit fox",
               "n01530575": "brambling", "n03218198": "dogsled"}
    (root / "info").mkdir(parents=True)
    (root / "info" / "synsets.txt").write_text("".join(f"{w} {n}\n" for w, n in synsets.items()))
    lines = []
    for label, wnid in enumerate(synsets):
        for j in range(4):
            path = f"google/q{label:04d}/{j:06d}.jpg"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (9, 7), (label * 50, j * 60, 9)).save(root / path)
            lines.append(f"{path} {label}\n")
    (root / "info" / "train_filelist_google.txt").write_text("".join(lines))
    (root / "info" / "train_filelist_flickr.txt").write_text("")
    is_a = tmp_path / "wordnet.is_a.txt"
    is_a.write_text("n00015388 n02084071\nn02084071 n02085620\nn02084071 n02099601\nn00015388 n02119789\n"
                    "n00015388 n01530575\nn00021939 n03218198\nn00015388 n02115335\nn00021939 n03803284\n")
    build("webvision", root, tmp_path / "pool", "--split", "train", "--benchmark-exclusions", "dog",
          "--wordnet-is-a", is_a, "--samples-per-shard", 3)
    assert "kept 2 of 5 classes, 8 of 20 samples" in capsys.readouterr().out
    pool = ShardSplit.open(tmp_path / "pool")
    assert pool.classes == ["kit fox", "brambling"]
    excluded = {e["id"]: e for e in pool.manifest["filter"]["excluded"]}
    assert set(excluded) == {"n02085620", "n02099601", "n03218198"}
    streams = [OutlierStream(pool, lambda img: torch.tensor(img.getpixel((0, 0))), batch_size=4,
                             batches_per_epoch=5, rank=r, world_size=2, num_workers=1, seed=0)
               for r in range(2)]
    assert [sum(1 for _ in s.loader(0)) for s in streams] == [5, 5]
    with pytest.raises(SystemExit):  # an unknown wnid is an error, not silently ignored
        build("webvision", root, tmp_path / "x", "--split", "train", "--exclude-descendants-of", "n99999999",
              "--wordnet-is-a", is_a)
    assert "n99999999" in capsys.readouterr().err
