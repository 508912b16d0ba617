"""Dataset layout readers, each on a tiny fixture written in the dataset's real on-disk format."""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import pickle
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from disttrain.data.layouts import DataError, Listing, read_layout
from disttrain.data.layouts.folders import check_listed

# --------------------------------------------------------------------------- fixture helpers


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i) % 256, (91 * i + 50) % 256, (173 * i + 100) % 256


def images(root: Path, rels: list[str]) -> dict[str, bytes]:
    """8x8 images of distinct colours at root/rel (format by suffix); {rel: the file's bytes}."""
    written = {}
    for i, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour(i)).save(path, format="PNG" if rel.lower().endswith(".png") else "JPEG")
        written[rel] = path.read_bytes()
    return written


def text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def mat(path: Path, **variables: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, variables)


def cell(strings: list[str], column: bool = True) -> np.ndarray:
    """A MATLAB cell array of strings: N x 1 (or 1 x N)."""
    values = np.empty(len(strings), dtype=object)
    values[:] = strings
    return values[:, None] if column else values[None, :]


def struct_array(rows: list[dict[str, object]]) -> np.ndarray:
    """A 1 x N MATLAB struct array with the rows' fields."""
    out = np.empty((1, len(rows)), dtype=[(name, object) for name in rows[0]])
    for i, row in enumerate(rows):
        for name, value in row.items():
            out[0, i][name] = value
    return out


def sources(listing: Listing) -> dict[str, int]:
    """{source: label}, in listing order."""
    return {r.meta["source"]: r.label for r in listing.records}


def check(listing: Listing, files: dict[str, bytes] | None = None) -> Listing:
    """Keys are unique, and every file record's bytes are its source file's, unchanged."""
    keys = [r.key for r in listing.records]
    assert len(set(keys)) == len(keys)
    assert len(listing.classes) == len(listing.class_ids)
    for r in listing.records:
        assert "source" in r.meta and "class" in r.meta
        assert r.meta["class"] == (listing.classes[r.label] if r.label >= 0 else None)
        if files is not None:
            assert r.encoded()[0] == files[r.meta["source"]]
    return listing


def pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def check_pixels(listing: Listing, expected: np.ndarray) -> None:
    check(listing)
    assert len(listing) == len(expected)
    for r, image in zip(listing.records, expected):
        assert r.path is None and r.pixels.shape == (32, 32, 3) and r.pixels.dtype == np.uint8
        np.testing.assert_array_equal(r.pixels, image)
    data, ext = listing.records[-1].encoded()
    assert ext == "png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected[-1])


# --------------------------------------------------------------------------- folders.py


TREE = ["b/x1.png", "a/sub/y1.jpg", "a/z1.JPEG", "a/w.jpeg"]


def test_imagefolder(tmp_path: Path) -> None:
    files = images(tmp_path, TREE)
    text(tmp_path / "a" / "notes.txt", ["not an image"])
    images(tmp_path, [".hidden/h.jpg", "a/._y1.jpg"])
    listing = check(read_layout("imagefolder", tmp_path, "all"), files)
    assert listing.classes == listing.class_ids == ["a", "b"]
    assert sources(listing) == {"a/sub/y1.jpg": 0, "a/w.jpeg": 0, "a/z1.JPEG": 0, "b/x1.png": 1}
    assert [r.key for r in listing.records] == ["a/sub/y1", "a/w", "a/z1", "b/x1"]
    assert listing.records[2].encoded()[1] == "jpg"


def test_folder_is_unlabelled_in_sorted_order(tmp_path: Path) -> None:
    files = images(tmp_path, TREE)
    listing = check(read_layout("folder", tmp_path, "all"), files)
    assert listing.classes == [] and list(sources(listing)) == sorted(TREE)
    assert {r.label for r in listing.records} == {-1}


def test_filelist(tmp_path: Path) -> None:
    files = images(tmp_path, ["imgs/x.jpg", "imgs/y.png", "imgs/z.jpg", "with space.jpg"])
    text(tmp_path / "lists" / "train.txt", ["imgs/x.jpg 2", "./imgs/y.png\t0", "", "imgs/z.jpg", "with space.jpg 1"])
    for split in ("lists/train.txt", str(tmp_path / "lists" / "train.txt")):
        listing = check(read_layout("filelist", tmp_path, split), files)
        assert listing.classes == listing.class_ids == ["0", "1", "2"]
        assert sources(listing) == {"imgs/x.jpg": 2, "imgs/y.png": 0, "imgs/z.jpg": -1, "with space.jpg": 1}
    text(tmp_path / "lists" / "bad.txt", ["imgs/x.jpg 0", "imgs/gone.jpg 1"])
    with pytest.raises(DataError, match="imgs/gone.jpg"):
        read_layout("filelist", tmp_path, "lists/bad.txt")


def test_dtd(tmp_path: Path) -> None:
    rels = [f"images/{c}/{c}_{i:04d}.jpg" for c in ("striped", "banded") for i in (1, 2)]
    files = images(tmp_path, rels)
    text(tmp_path / "labels" / "train1.txt", ["banded/banded_0002.jpg", "striped/striped_0001.jpg"])
    text(tmp_path / "labels" / "test10.txt", ["striped/striped_0002.jpg"])
    every = check(read_layout("dtd", tmp_path, "all"), files)
    assert every.classes == every.class_ids == ["banded", "striped"] and len(every) == 4
    train = check(read_layout("dtd", tmp_path, "train1"), files)
    assert sources(train) == {"images/banded/banded_0002.jpg": 0, "images/striped/striped_0001.jpg": 1}
    assert sources(read_layout("dtd", tmp_path, "test10")) == {"images/striped/striped_0002.jpg": 1}
    with pytest.raises(DataError, match="labels/val1.txt"):
        read_layout("dtd", tmp_path, "val1")


def test_tinyimagenet(tmp_path: Path) -> None:
    text(tmp_path / "wnids.txt", ["n02124075", "n01443537"])
    text(tmp_path / "words.txt", ["n01443537\tgoldfish, Carassius auratus", "n02124075\tEgyptian cat", "n0000\tx"])
    files = images(tmp_path, [f"train/{w}/images/{w}_{i}.JPEG" for w in ("n02124075", "n01443537") for i in (0, 1)]
                   + ["val/images/val_0.JPEG", "val/images/val_1.JPEG"])
    text(tmp_path / "train" / "n01443537" / "n01443537_boxes.txt", ["n01443537_0.JPEG\t0\t0\t8\t8"])
    text(tmp_path / "val" / "val_annotations.txt", ["val_0.JPEG\tn02124075\t0\t0\t8\t8",
                                                     "val_1.JPEG\tn01443537\t1\t1\t7\t7"])
    train = check(read_layout("tinyimagenet", tmp_path, "train"), files)
    assert train.class_ids == ["n01443537", "n02124075"] and train.classes == ["goldfish", "Egyptian cat"]
    assert [r.label for r in train.records] == [0, 0, 1, 1]
    val = check(read_layout("tinyimagenet", tmp_path, "val"), files)
    assert sources(val) == {"val/images/val_0.JPEG": 1, "val/images/val_1.JPEG": 0}


# --------------------------------------------------------------------------- finegrained.py


def test_cub(tmp_path: Path) -> None:
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rels = [f"{folders[i % 2]}/img_{i}.jpg" for i in range(5)]
    files = images(tmp_path / "images", rels)
    text(tmp_path / "classes.txt", ["2 002.Laysan_Albatross", "1 001.Black_footed_Albatross"])
    text(tmp_path / "images.txt", [f"{i + 1} {rel}" for i, rel in enumerate(rels)])
    text(tmp_path / "image_class_labels.txt", [f"{i + 1} {i % 2 + 1}" for i in range(5)])
    text(tmp_path / "train_test_split.txt", [f"{i + 1} {int(i < 3)}" for i in range(5)])
    files = {f"images/{rel}": data for rel, data in files.items()}
    every = check(read_layout("cub", tmp_path, "all"), files)
    assert every.classes == ["Black footed Albatross", "Laysan Albatross"] and every.class_ids == folders
    assert [r.label for r in every.records] == [0, 1, 0, 1, 0]
    assert [len(read_layout("cub", tmp_path, s)) for s in ("train", "test")] == [3, 2]
    assert list(sources(read_layout("cub", tmp_path, "test"))) == [f"images/{rel}" for rel in rels[3:]]


@pytest.mark.parametrize("lists", ["", "lists/"])
def test_stanford_dogs(tmp_path: Path, lists: str) -> None:
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    rels = [f"{folders[i % 2]}/{folders[i % 2][:9]}_{i}.jpg" for i in range(4)]
    files = {f"Images/{rel}": data for rel, data in images(tmp_path / "Images", rels).items()}
    for split, picked in (("train", rels[:3]), ("test", rels[3:])):
        mat(tmp_path / f"{lists}{split}_list.mat", file_list=cell(picked),
            labels=np.array([[folders.index(r.split("/")[0]) + 1] for r in picked], dtype=float))
    train = check(read_layout("stanford_dogs", tmp_path, "train"), files)
    assert train.classes == ["Chihuahua", "Japanese spaniel"] and train.class_ids == ["n02085620", "n02085782"]
    assert sources(train) == {f"Images/{rels[0]}": 0, f"Images/{rels[1]}": 1, f"Images/{rels[2]}": 0}
    assert sources(check(read_layout("stanford_dogs", tmp_path, "test"), files)) == {f"Images/{rels[3]}": 1}


@pytest.mark.parametrize("resolution", ["low-resolution", "high-resolution"])
def test_tsinghua_dogs(tmp_path: Path, resolution: str) -> None:
    # The leading number counts the class's images; the order is the nNNNNNN id's.
    folders = ["1043-n000002-Shiba_Dog", "200-n000010-Airedale", "200-n000001-French_bulldog"]
    listed = [f"low-resolution/{f}/n{i:06d}.jpg" for i, f in enumerate(folders + folders)]
    rels = [r.replace("low-resolution", resolution) for r in listed]
    files = images(tmp_path, rels)
    text(tmp_path / "TrainAndValList" / "train.lst", [".//" + listed[0], ".\\\\" + listed[1].replace("/", "\\"),
                                                       "./" + listed[2], listed[3]])
    lst = tmp_path / "TrainAndValList" / "train.lst"
    lst.write_bytes(b"\xff" + lst.read_bytes())  # a stray non-UTF-8 byte in front
    text(tmp_path / "TrainAndValList" / "validation.lst", [".//" + r.split("/", 1)[1] for r in listed[4:]])
    train = check(read_layout("tsinghua_dogs", tmp_path, "train"), files)
    assert train.class_ids == ["n000001", "n000002", "n000010"]
    assert train.classes == ["French bulldog", "Shiba Dog", "Airedale"]
    assert list(sources(train).items()) == [(rels[0], 1), (rels[1], 2), (rels[2], 0), (rels[3], 1)]
    assert sources(check(read_layout("tsinghua_dogs", tmp_path, "val"), files)) == {rels[4]: 2, rels[5]: 0}


def test_flowers102(tmp_path: Path) -> None:
    files = images(tmp_path, [f"jpg/image_{i:05d}.jpg" for i in range(1, 8)])
    mat(tmp_path / "imagelabels.mat", labels=np.array([[77, 1, 102, 1, 5, 77, 2]], dtype=np.uint8))
    mat(tmp_path / "setid.mat", trnid=np.array([[2, 1]]), valid=np.array([[3]]), tstid=np.array([[4, 5, 6, 7]]))
    train = check(read_layout("flowers102", tmp_path, "train"), files)
    assert train.classes[:2] == ["class_001", "class_002"] and train.class_ids[-1] == "102"
    assert len(train.classes) == 102
    assert sources(train) == {"jpg/image_00002.jpg": 0, "jpg/image_00001.jpg": 76}
    assert [len(read_layout("flowers102", tmp_path, s)) for s in ("val", "test", "trainval")] == [1, 4, 3]
    (tmp_path / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "77": "passion flower"}))
    named = read_layout("flowers102", tmp_path, "val")
    assert named.classes[0] == "pink primrose" and named.classes[76] == "passion flower"
    assert named.classes[1] == "class_002" and named.records[0].label == 101


@pytest.mark.parametrize("test_annos", ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"])
def test_stanford_cars(tmp_path: Path, test_annos: str) -> None:
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    files = images(tmp_path, [f"cars_train/{i:05d}.jpg" for i in (1, 2, 3)] + ["cars_test/00001.jpg"])
    mat(tmp_path / "devkit" / "cars_meta.mat", class_names=cell(names, column=False))

    def annos(fnames: list[str], classes: list[int]) -> np.ndarray:
        return struct_array([{"bbox_x1": np.uint16(1), "bbox_y1": np.uint16(1), "bbox_x2": np.uint16(7),
                              "bbox_y2": np.uint16(7), "class": np.uint8(c), "fname": f}
                             for f, c in zip(fnames, classes)])

    mat(tmp_path / "devkit" / "cars_train_annos.mat", annotations=annos(["00003.jpg", "00001.jpg", "00002.jpg"],
                                                                        [3, 1, 3]))
    mat(tmp_path / test_annos, annotations=annos(["00001.jpg"], [2]))  # one row: squeezes to a 0-d struct
    train = check(read_layout("stanford_cars", tmp_path, "train"), files)
    assert train.classes == names and train.class_ids == ["001", "002", "003"]
    assert list(sources(train).items()) == [("cars_train/00003.jpg", 2), ("cars_train/00001.jpg", 0),
                                            ("cars_train/00002.jpg", 2)]
    assert sources(check(read_layout("stanford_cars", tmp_path, "test"), files)) == {"cars_test/00001.jpg": 1}


def test_stanford_cars_test_without_labels(tmp_path: Path) -> None:
    images(tmp_path, ["cars_test/00001.jpg"])
    mat(tmp_path / "devkit" / "cars_meta.mat", class_names=cell(["A"], column=False))
    mat(tmp_path / "devkit" / "cars_test_annos.mat", annotations=struct_array([{"fname": "00001.jpg"}]))
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        read_layout("stanford_cars", tmp_path, "test")


def test_fgvc_aircraft(tmp_path: Path) -> None:
    variants = ["707-320", "Cessna 172", "F/A-18"]
    ids = ["1025794", "0034309", "2233445", "0062781"]
    files = images(tmp_path / "data", [f"images/{i}.jpg" for i in ids])
    text(tmp_path / "data" / "variants.txt", variants)
    text(tmp_path / "data" / "images_variant_trainval.txt", [f"{ids[0]} Cessna 172", f"{ids[1]} F/A-18",
                                                              f"{ids[2]} 707-320"])
    text(tmp_path / "data" / "images_variant_test.txt", [f"{ids[3]} Cessna 172"])
    for root in (tmp_path, tmp_path / "data"):
        trainval = check(read_layout("fgvc_aircraft", root, "trainval"), files)
        assert trainval.classes == trainval.class_ids == variants
        assert [(r.key, r.label) for r in trainval.records] == [(f"images/{ids[0]}", 1), (f"images/{ids[1]}", 2),
                                                                (f"images/{ids[2]}", 0)]
        assert sources(read_layout("fgvc_aircraft", root, "test")) == {f"images/{ids[3]}.jpg": 1}


# --------------------------------------------------------------------------- arrays.py


def cifar_batch(path: Path, data: np.ndarray, protocol: int = 2, **labels: list[int]) -> None:
    """A CIFAR python batch: R, G, B planes of each image in a row of 3072 bytes."""
    batch = {b"batch_label": b"batch", b"data": data.transpose(0, 3, 1, 2).reshape(len(data), -1),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(data))],
             **{k.encode(): v for k, v in labels.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def python2_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    """A CIFAR batch as the original files were written: cPickle protocol 2 by Python 2 with numpy 1
    (str as BINSTRING, the array through numpy.core.multiarray._reconstruct and numpy.dtype)."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    rows = data.transpose(0, 3, 1, 2).reshape(len(data), -1)
    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"  # dtype('u1', 0, 1)
             + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
             + b"\x87R" + b"(" + integer(1) + integer(rows.shape[0]) + integer(rows.shape[1]) + b"\x86" + dtype
             + b"\x89" + string(rows.tobytes()) + b"tb")  # __setstate__((1, shape, dtype, False, raw bytes))
    batch = (b"\x80\x02}(" + string(b"batch_label") + string(b"training batch 1 of 5") + string(b"data") + array
             + string(b"labels") + b"](" + b"".join(integer(y) for y in labels) + b"e" + b"u.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(batch)


def test_cifar10(tmp_path: Path) -> None:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    train = pixels(10, seed=1)
    for b in range(5):
        cifar_batch(tmp_path / f"data_batch_{b + 1}", train[2 * b:2 * b + 2], labels=[2 * b, 2 * b + 1])
    cifar_batch(tmp_path / "test_batch", pixels(3, seed=2), labels=[9, 0, 3])
    listing = read_layout("cifar10", tmp_path, "train")
    check_pixels(listing, train)
    assert listing.classes == listing.class_ids == names
    assert [r.label for r in listing.records] == list(range(10))
    assert listing.records[3].key == "train/00000003" and listing.records[3].meta["source"] == "data_batch_2:1"
    test = read_layout("cifar10", tmp_path, "test")
    check_pixels(test, pixels(3, seed=2))
    assert [r.label for r in test.records] == [9, 0, 3] and test.records[2].meta["class"] == "cat"


def test_cifar100(tmp_path: Path) -> None:
    names = [f"class{i}" for i in range(100)]
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [n.encode() for n in names],
                                                  b"coarse_label_names": [b"c"] * 20}))
    cifar_batch(tmp_path / "train", pixels(4, seed=3), fine_labels=[99, 0, 5, 5], coarse_labels=[1, 2, 3, 3])
    cifar_batch(tmp_path / "test", pixels(2, seed=4), fine_labels=[7, 8], coarse_labels=[0, 0])
    train = read_layout("cifar100", tmp_path, "train")
    check_pixels(train, pixels(4, seed=3))
    assert train.classes == names and [r.label for r in train.records] == [99, 0, 5, 5]
    assert [r.key for r in read_layout("cifar100", tmp_path, "test").records] == ["test/00000000", "test/00000001"]


def cifar10_meta(root: Path) -> None:
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


@pytest.mark.parametrize("written_by", ["python2", 2, 3, 4, 5])
def test_cifar_batches_as_python_and_numpy_write_them(tmp_path: Path, written_by: str | int) -> None:
    """The restricted unpickler reads the original (Python 2) batches and those modern Python/numpy
    write at any protocol: their numpy arrays (_reconstruct, _frombuffer) and bytes (_codecs)."""
    cifar10_meta(tmp_path)
    data = pixels(3, seed=6)
    if written_by == "python2":
        python2_cifar_batch(tmp_path / "test_batch", data, [4, 0, 9])
    else:
        cifar_batch(tmp_path / "test_batch", data, protocol=written_by, labels=[4, 0, 9])
    listing = read_layout("cifar10", tmp_path, "test")
    check_pixels(listing, data)
    assert [r.label for r in listing.records] == [4, 0, 9]


def test_cifar_unpickler_rebuilds_numpy_values(tmp_path: Path) -> None:
    from disttrain.data.layouts.arrays import _unpickle

    value = {b"data": np.arange(12, dtype=np.int16).reshape(3, 4).T, b"mean": np.float32(0.5), b"n": np.int64(7),
             b"nested": [(1, 2.5, b"x", "y", None, True)]}
    for protocol in (2, 4, 5):
        (tmp_path / "batch").write_bytes(pickle.dumps(value, protocol=protocol))
        got = _unpickle(tmp_path / "batch")
        assert np.array_equal(got[b"data"], value[b"data"]) and got[b"data"].dtype == np.int16
        assert got[b"mean"] == np.float32(0.5) and got[b"n"] == 7 and got[b"nested"] == value[b"nested"]
    (tmp_path / "batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="holds a list, not a dict"):
        _unpickle(tmp_path / "batch")
    (tmp_path / "batch").write_bytes(pickle.dumps({b"data": np.zeros(2)}, protocol=2)[:-9])
    with pytest.raises(DataError, match="cannot read .*batch as a CIFAR python batch"):
        _unpickle(tmp_path / "batch")


class Payload:
    """Unpickling calls `call(*args)`: what a crafted pickle does."""

    def __init__(self, call: object, *args: object):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


PAYLOADS = {  # each would create `target`; the global it names when pickled (at protocol 2, as Python 2 would)
    "os.system": (lambda target: Payload(os.system, f"touch {target}"), r"posix\.system|os\.system"),
    "open": (lambda target: Payload(open, str(target), "w"), r"io\.open|builtins\.open"),
    "subprocess.Popen": (lambda target: Payload(subprocess.Popen, ["touch", str(target)]),
                         r"subprocess\.Popen|commands\.Popen"),  # protocol 2 writes Python 2's name
    # the one global admitted through a wrapper: _codecs.encode, for latin1 only
    "_codecs.encode, not latin1": (lambda target: Payload(codecs.encode, "x", "rot13"), None),
}


@pytest.mark.parametrize("file", ["test_batch", "batches.meta"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path, payload: str, file: str) -> None:
    """A batch or meta file whose unpickling would call os.system / open / Popen: a DataError naming
    the file and the global, raised before the call (the file the payload would create is absent)."""
    make, global_name = PAYLOADS[payload]
    target = tmp_path / "pwned"
    cifar10_meta(tmp_path)
    cifar_batch(tmp_path / "test_batch", pixels(2, seed=7), labels=[1, 2])
    (tmp_path / file).write_bytes(pickle.dumps({b"label_names": [b"c"] * 10, b"data": make(target),
                                                b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError) as err:
        read_layout("cifar10", tmp_path, "test")
    assert str(tmp_path / file) in str(err.value)
    if global_name:
        assert "refusing to unpickle" in str(err.value)
        assert re.search(f"loads the global ({global_name})", str(err.value)), str(err.value)
    else:
        assert "only latin1" in str(err.value)
    assert not target.exists()


def test_svhn(tmp_path: Path) -> None:
    data = pixels(4, seed=5)
    for split in ("train", "extra"):
        mat(tmp_path / f"{split}_32x32.mat", X=data.transpose(1, 2, 3, 0), y=np.array([[10], [1], [5], [9]],
                                                                                      dtype=np.uint8))
    for split in ("train", "extra"):
        listing = read_layout("svhn", tmp_path, split)
        check_pixels(listing, data)
        assert listing.classes == [str(d) for d in range(10)] and [r.label for r in listing.records] == [0, 1, 5, 9]
        assert listing.records[0].key == f"{split}/00000000"


# --------------------------------------------------------------------------- webvision.py


def webvision_root(root: Path, val_folder: str = "val_images_256") -> dict[str, bytes]:
    text(root / "info" / "synsets.txt", ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus",
                                         "n01484850 great white shark, white shark"])
    files = images(root, ["google/q0001/000000.jpg", "google/q0002/000000.jpg", "flickr/q0001/000000.jpg",
                          f"{val_folder}/val000001.jpg".lstrip("/")])
    text(root / "info" / "train_filelist_google.txt", ["google/q0001/000000.jpg 0", "google/q0002/000000.jpg 2"])
    text(root / "info" / "train_filelist_flickr.txt", ["flickr/q0001/000000.jpg 1"])
    text(root / "info" / "val_filelist.txt", ["val000001.jpg 2"])
    return files


@pytest.mark.parametrize("val_folder", ["val_images_256", "val_images", ""])
def test_webvision(tmp_path: Path, val_folder: str) -> None:
    files = webvision_root(tmp_path, val_folder)
    train = check(read_layout("webvision", tmp_path, "train"), files)
    assert train.classes == ["tench", "goldfish", "great white shark"]
    assert train.class_ids == ["n01440764", "n01443537", "n01484850"]
    assert list(sources(train).items()) == [("google/q0001/000000.jpg", 0), ("google/q0002/000000.jpg", 2),
                                            ("flickr/q0001/000000.jpg", 1)]
    assert [len(read_layout("webvision", tmp_path, s)) for s in ("train_google", "train_flickr")] == [2, 1]
    val = check(read_layout("webvision", tmp_path, "val"), files)
    assert sources(val) == {f"{val_folder}/val000001.jpg".lstrip("/"): 2}


def test_webvision_missing_files(tmp_path: Path) -> None:
    webvision_root(tmp_path)
    (tmp_path / "google" / "q0002" / "000000.jpg").unlink()
    with pytest.raises(DataError, match=r"1 file\(s\) listed .* e\.g\. google/q0002/000000\.jpg"):
        read_layout("webvision", tmp_path, "train_google")
    (tmp_path / "val_images_256" / "val000001.jpg").unlink()
    with pytest.raises(DataError, match="val_images_256/"):
        read_layout("webvision", tmp_path, "val")


def test_check_listed_samples_long_lists(tmp_path: Path) -> None:
    images(tmp_path, ["a.jpg"])
    rels = ["a.jpg"] * 55 + ["gone.jpg"] + ["a.jpg"] * 44
    check_listed("t", tmp_path / "list", tmp_path, rels, head=10, sample=9)  # checks 0..9 and every 10th: not 55
    with pytest.raises(DataError, match=r"1 file\(s\) listed in .* \(of the 70 checked of 100\), e\.g\. gone"):
        check_listed("t", tmp_path / "list", tmp_path, rels, head=60, sample=10)
    with pytest.raises(DataError, match=r"under \S+, e\.g\. gone\.jpg"):  # all checked: no sample note
        check_listed("t", tmp_path / "list", tmp_path, rels, head=10, sample=90)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("layout", "split", "expected"), [
    ("imagefolder", "all", "one sub-folder per class"),
    ("folder", "all", "no images found"),
    ("filelist", "lists/train.txt", "lists/train.txt"),
    ("dtd", "train4", "labels/train4.txt"),
    ("tinyimagenet", "val", "val/val_annotations.txt"),
    ("cub", "train", "image_class_labels.txt"),
    ("stanford_dogs", "test", "test_list.mat"),
    ("tsinghua_dogs", "val", "TrainAndValList/validation.lst"),
    ("flowers102", "test", "setid.mat"),
    ("stanford_cars", "train", "devkit/cars_train_annos.mat"),
    ("fgvc_aircraft", "trainval", "data/images_variant_trainval.txt"),
    ("cifar10", "train", "data_batch_1"),
    ("cifar100", "test", "meta"),
    ("svhn", "extra", "extra_32x32.mat"),
    ("webvision", "train", "info/train_filelist_flickr.txt"),
])
def test_wrong_layout_names_the_expected_files(tmp_path: Path, layout: str, split: str, expected: str) -> None:
    text(tmp_path / "README.txt", ["some other dataset"])
    with pytest.raises(DataError, match=expected):
        read_layout(layout, tmp_path, split)


def test_unknown_split_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no split 'val'.*train, test"):
        read_layout("cifar10", tmp_path, "val")
    with pytest.raises(DataError, match="unknown dataset layout 'imagenet21k'"):
        read_layout("imagenet21k", tmp_path, "train")
