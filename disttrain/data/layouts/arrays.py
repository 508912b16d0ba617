"""Datasets shipped as arrays: CIFAR-10/100 (python pickles) and SVHN (cropped digits, .mat)."""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from disttrain.data.layouts import Listing, Record, expect_files, register
from disttrain.data.layouts.folders import check_labels, listing, read_mat
from disttrain.data.shards import DataError


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as pickles written by Python 3 at protocol 0-2 use it for bytes
    (`_codecs.encode(text, "latin1")`), and for nothing else: any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):  # compared as written: a codec lookup could import modules
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}: only latin1 rebuilds bytes")
    return codecs.encode(text, "latin1", errors)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR python batch and nothing else: a pickle names every callable it will call
    (a "global") before calling it, and `find_class` admits only what these batches hold.

    Containers, numbers, strings and bytes need no global. The globals admitted rebuild numpy
    arrays: `_reconstruct`, `ndarray`, `dtype` (the original batches, written by Python 2 with
    numpy 1: `numpy.core.multiarray`; modern numpy at protocol <= 4: `numpy._core.multiarray`),
    `_frombuffer` (modern numpy at protocol 5), `scalar` (a numpy scalar), and bytes written by
    Python 3 at protocol 2 (`_codecs.encode`, latin1 only). Any other global, e.g. `os.system`
    or `builtins.open`, raises DataError naming the file and the global, before anything is called."""

    ALLOWED = frozenset({
        *((package, name) for package in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name in ("_reconstruct", "scalar")),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes: the keys are b"data", b"labels", ...
        self.path = path

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in self.ALLOWED:
            raise DataError(f"{self.path}: refusing to unpickle: it loads the global {module}.{name}, and a "
                            f"CIFAR python batch holds only containers, numbers, strings, bytes and numpy arrays "
                            f"(a file from disk is never unpickled with the general unpickler)")
        return getattr(importlib.import_module(module), name)  # as named: no Python 2 name mapping


def _unpickle(path: Path) -> dict[bytes, Any]:
    with path.open("rb") as f:
        try:
            batch = _CifarUnpickler(f, path).load()
        except DataError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, ImportError, AttributeError) as err:
            raise DataError(f"cannot read {path} as a CIFAR python batch: {err}") from err
    if not isinstance(batch, dict):
        raise DataError(f"cannot read {path} as a CIFAR python batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _array_records(split: str, pixels: np.ndarray, labels: list[int], classes: list[str],
                   sources: list[str]) -> list[Record]:
    """One record per image of `pixels` (N x H x W x 3), keyed `<split>/<index, 8 digits>`."""
    return [Record(f"{split}/{i:08d}", label, pixels=pixels[i], meta={"source": sources[i], "class": classes[label]})
            for i, label in enumerate(labels)]


def _cifar(layout: str, root: Path, split: str, files: list[str], meta_file: str, names_key: bytes,
           labels_key: bytes) -> Listing:
    expect_files(layout, root, [*files, meta_file])
    classes = [n.decode() for n in _unpickle(root / meta_file)[names_key]]
    pixels, labels, sources = [], [], []
    for name in files:
        batch = _unpickle(root / name)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{layout}: {root / name} data is {data.shape}, not N x 3072")
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes -> H x W x 3
        labels += [int(x) for x in batch[labels_key]]
        sources += [f"{name}:{i}" for i in range(len(data))]
    check_labels(layout, root / files[0], labels, len(classes))
    images = np.ascontiguousarray(np.concatenate(pixels))
    return listing(layout, root, split, classes, list(classes), _array_records(split, images, labels, classes, sources))


@register("cifar10", ("train", "test"), "CIFAR-10 python version: cifar-10-batches-py/")
def cifar10(root: Path, split: str) -> Listing:
    """CIFAR-10, python version: the `cifar-10-batches-py/` folder.

        data_batch_1 ... data_batch_5, test_batch    pickles: b"data" (N x 3072 uint8: the R, G, B planes of
                                                     32 x 32 images), b"labels"
        batches.meta                                 b"label_names": the 10 class names, in label order

    Class ids are the names. Keys are `<split>/<index in the split, 8 digits>`.
    """
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar("cifar10", root, split, files, "batches.meta", b"label_names", b"labels")


@register("cifar100", ("train", "test"), "CIFAR-100 python version: cifar-100-python/ (fine labels)")
def cifar100(root: Path, split: str) -> Listing:
    """CIFAR-100, python version: the `cifar-100-python/` folder.

        train, test    pickles: b"data" (N x 3072 uint8, R, G, B planes), b"fine_labels", b"coarse_labels"
        meta           b"fine_label_names": the 100 class names, in label order

    The 100 fine classes (ids: their names). Keys are `<split>/<index in the split, 8 digits>`.
    """
    return _cifar("cifar100", root, split, [split], "meta", b"fine_label_names", b"fine_labels")


@register("svhn", ("train", "test", "extra"), "SVHN cropped digits: {train,test,extra}_32x32.mat")
def svhn(root: Path, split: str) -> Listing:
    """SVHN, format 2 (cropped 32 x 32 digits):

        train_32x32.mat, test_32x32.mat, extra_32x32.mat    X: 32 x 32 x 3 x N uint8; y: N x 1, 1..10
                                                            where 10 is the digit 0

    Classes are "0".."9" (label = the digit). Keys are `<split>/<index in the file, 8 digits>`.
    """
    name = f"{split}_32x32.mat"
    expect_files("svhn", root, [name])
    mat = read_mat(root / name, squeeze_me=False)
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4 or mat["X"].shape[2] != 3:
        raise DataError(f"svhn: {root / name} has no X (32 x 32 x 3 x N) and y (N x 1) arrays")
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
    labels = [y % 10 if 0 <= y <= 10 else y for y in np.asarray(mat["y"]).ravel().astype(int).tolist()]
    if len(labels) != len(images):
        raise DataError(f"svhn: {root / name} has {len(images)} images but {len(labels)} labels")
    check_labels("svhn", root / name, labels, 10)
    classes = [str(d) for d in range(10)]
    sources = [f"{name}:{i}" for i in range(len(images))]
    return listing("svhn", root, split, classes, list(classes), _array_records(split, images, labels, classes, sources))
