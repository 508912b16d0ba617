"""ID / OOD class splits: which classes of a dataset are in-distribution and which are held out.

A split file is JSON:

    {"format": "disttrain-split/1", "dataset": "cub", "num_classes": 200,
     "id": [0, 3, ...], "ood": [1, 2, ...], "id_names": [...], "ood_names": [...],
     "method": "rank", "details": {...}}

`id` and `ood` are class indices of the full dataset, each listed in the dataset's order.

Ways to make one:
  rank_split       MixupOE App. A: keep the classes a classifier trained on all classes
                   gets most right and most confidently (S(c) = accuracy - mean entropy)
  cmg_split        CMG Sec. 4.1: the five fixed known-class partitions
  partition_split  any given list of known classes
  random_split     a seeded random choice
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from disttrain import files
from disttrain.data.shards import DataError

SPLIT_FORMAT = "disttrain-split/1"

# MixupOE App. B, Table 3: ID classes per fine-grained benchmark (the rest are held out).
BENCHMARK_ID_CLASSES = {"bird": 100, "dog": 100, "flower": 90, "car": 100, "aircraft": 90}

# CMG Sec. 4.1 (after Neal et al.): five partitions of known classes per dataset kind.
CMG_NUM_CLASSES = {"10class": 10, "tinyimagenet": 200}
CMG_PARTITIONS: dict[str, dict[int, tuple[int, ...]]] = {
    # MNIST, SVHN, CIFAR-10: 6 known classes 0-5, 1-6, 2-7, 3-8, 4-9; the other 4 are OOD.
    "10class": {p: tuple(range(p - 1, p + 5)) for p in range(1, 6)},
    # TinyImageNet: 20 known classes each. The paper prints the fifth set as "160-189", which
    # is 30 classes, while saying every set has 20: we take 160-179, the 20-class set that
    # continues the 40-class stride of the first four.
    "tinyimagenet": {p: tuple(range(40 * (p - 1), 40 * (p - 1) + 20)) for p in range(1, 6)},
}


# --------------------------------------------------------------------------- split dicts


def make_split(dataset: str, num_classes: int, id_classes: Sequence[int], method: str,
               details: dict[str, Any] | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A validated split dict: `id_classes` in-distribution, every other class OOD."""
    id_sorted = sorted({int(c) for c in id_classes})
    ood = sorted(set(range(num_classes)) - set(id_sorted))
    split: dict[str, Any] = {"format": SPLIT_FORMAT, "dataset": dataset, "num_classes": int(num_classes),
                             "id": id_sorted, "ood": ood}
    if class_names is not None:
        if len(class_names) != num_classes:
            raise DataError(f"{len(class_names)} class names given for {num_classes} classes")
        split["id_names"] = [class_names[c] for c in id_sorted]
        split["ood_names"] = [class_names[c] for c in ood]
    split["method"] = method
    split["details"] = details or {}
    return validate_split(split)


def _is_index_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def validate_split(split: Any, source: str = "split") -> dict[str, Any]:
    """`split` if it is a well-formed split dict; a DataError naming the problem otherwise."""
    if not isinstance(split, dict) or split.get("format") != SPLIT_FORMAT:
        found = split.get("format") if isinstance(split, dict) else type(split).__name__
        raise DataError(f"{source}: not a split file (format {found!r}, expected {SPLIT_FORMAT!r})")
    missing = [k for k in ("dataset", "num_classes", "id", "ood", "method") if k not in split]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)}")
    num = split["num_classes"]
    if not isinstance(num, int) or isinstance(num, bool) or num < 2:
        raise DataError(f"{source}: num_classes must be an integer >= 2, got {num!r}")
    for part in ("id", "ood"):
        indices = split[part]
        if not _is_index_list(indices) or not indices:
            raise DataError(f"{source}: {part!r} must be a non-empty list of class indices")
        if len(set(indices)) != len(indices):
            raise DataError(f"{source}: {part!r} lists a class twice")
        outside = [c for c in indices if not 0 <= c < num]
        if outside:
            raise DataError(f"{source}: {part!r} has indices {outside} outside 0..{num - 1}")
        names = split.get(f"{part}_names")
        if names is not None and len(names) != len(indices):
            raise DataError(f"{source}: {part}_names has {len(names)} names for {len(indices)} classes")
    overlap = sorted(set(split["id"]) & set(split["ood"]))
    if overlap:
        raise DataError(f"{source}: classes {overlap} are both ID and OOD")
    return split


def write_split(path: str | Path, split: dict[str, Any]) -> Path:
    """Validate `split` and write it atomically as JSON."""
    path = Path(path)
    validate_split(split, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.write_json(path, split)


def read_split(path: str | Path) -> dict[str, Any]:
    """Read and validate a split file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found; make one with a split method (rank, cmg, random)")
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON: {err}") from err
    return validate_split(split, str(path))


# --------------------------------------------------------------------------- ranking (MixupOE App. A)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _check_predictions(probs: np.ndarray, labels: np.ndarray) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels):
        raise DataError(f"expected probabilities N x C and labels N, got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise DataError(f"labels must lie in 0..{probs.shape[1] - 1}")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise DataError("rows of probs are not probability vectors; pass from_logits=True for logits")


def class_statistics(probs: np.ndarray, labels: np.ndarray, from_logits: bool = False) -> dict[str, np.ndarray]:
    """Per class c, over the test samples labelled c: their count, accuracy (argmax == c) and
    mean prediction entropy (natural log). DataError if a class has no samples."""
    probs = softmax(probs) if from_logits else np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    _check_predictions(probs, labels)
    num_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"classes {empty.tolist()} have no test samples, so they cannot be ranked; rank on a "
                        "split that has samples of every class")
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(axis=1)
    return {"count": counts,
            "accuracy": np.bincount(labels, weights=correct, minlength=num_classes) / counts,
            "entropy": np.bincount(labels, weights=entropy, minlength=num_classes) / counts}


def class_ranking_scores(probs: np.ndarray, labels: np.ndarray, from_logits: bool = False) -> np.ndarray:
    """S(c) = accuracy on class c - mean prediction entropy on class c (MixupOE App. A)."""
    stats = class_statistics(probs, labels, from_logits)
    return stats["accuracy"] - stats["entropy"]


def rank_classes(scores: np.ndarray) -> list[int]:
    """Class indices by decreasing score; ties go to the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(scores)), -scores)).tolist()


def rank_split(probs: np.ndarray, labels: np.ndarray, num_id: int, class_names: Sequence[str] | None = None,
               dataset: str = "", from_logits: bool = False) -> dict[str, Any]:
    """The split keeping the `num_id` classes with the highest S(c) as ID, the rest as OOD.

    `probs`: softmax outputs (or logits with `from_logits`) of a classifier trained on all
    classes, on the test samples; `labels`: their true classes."""
    stats = class_statistics(probs, labels, from_logits)
    scores = stats["accuracy"] - stats["entropy"]
    num_classes = len(scores)
    if not 1 <= num_id < num_classes:
        raise DataError(f"num_id must be between 1 and {num_classes - 1} (the dataset has {num_classes} classes)")
    ranking = rank_classes(scores)
    details = {"num_samples": len(labels), "from_logits": from_logits, "ranking": ranking,
               "scores": [round(float(s), 6) for s in scores],
               "accuracy": [round(float(a), 6) for a in stats["accuracy"]],
               "mean_entropy": [round(float(h), 6) for h in stats["entropy"]],
               "samples_per_class": stats["count"].tolist(),
               "cutoff_score": round(float(scores[ranking[num_id - 1]]), 6)}
    return make_split(dataset, num_classes, ranking[:num_id], "rank", details, class_names)


# --------------------------------------------------------------------------- fixed and random splits


def partition_split(num_classes: int, known: Sequence[int], dataset: str = "",
                    class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Known classes as given, the rest OOD."""
    known = [int(c) for c in known]
    if len(set(known)) != len(known):
        raise DataError(f"known classes list a class twice: {known}")
    return make_split(dataset, num_classes, known, "partition", {"known": sorted(known)}, class_names)


def cmg_split(dataset_kind: str, partition: int, dataset: str = "",
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """CMG's partition 1..5 for "10class" (MNIST/SVHN/CIFAR-10) or "tinyimagenet"."""
    if dataset_kind not in CMG_PARTITIONS:
        raise DataError(f"unknown CMG dataset kind {dataset_kind!r}; known: {', '.join(CMG_PARTITIONS)}")
    if partition not in CMG_PARTITIONS[dataset_kind]:
        raise DataError(f"CMG partition must be 1..5, got {partition!r}")
    return make_split(dataset or dataset_kind, CMG_NUM_CLASSES[dataset_kind], CMG_PARTITIONS[dataset_kind][partition],
                      "cmg", {"kind": dataset_kind, "partition": partition}, class_names)


def random_split(num_classes: int, num_id: int, seed: int, dataset: str = "",
                 class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """`num_id` ID classes drawn uniformly without replacement; a pure function of the seed."""
    if not 1 <= num_id < num_classes:
        raise DataError(f"num_id must be between 1 and {num_classes - 1}, got {num_id}")
    chosen = np.random.default_rng(seed).permutation(num_classes)[:num_id]
    return make_split(dataset, num_classes, chosen.tolist(), "random", {"seed": seed}, class_names)


def benchmark_num_id(name: str, num_classes: int | None = None) -> int:
    """The ID class count of a MixupOE benchmark (App. B); checked against `num_classes` if given."""
    if name not in BENCHMARK_ID_CLASSES:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_ID_CLASSES)}")
    num_id = BENCHMARK_ID_CLASSES[name]
    if num_classes is not None and not num_id < num_classes:
        raise DataError(f"benchmark {name} keeps {num_id} ID classes but the dataset has only {num_classes}")
    return num_id



# --------------------------------------------------------------------------- coarse ImageNet splits (MixupOE 5.5)

# mixupoe.txt App. H.1, Figure 12: two 50-class ImageNet-1k ID splits sharing little granularity;
# (ImageNet class index, wnid, name) in the paper's order. Each is OOD for the other (with
# Textures, LSUN, Places365), so the outlier pool must exclude both (class_filter: inet_a/inet_b).
INET_SPLITS: dict[str, tuple[tuple[int, str, str], ...]] = {
    "inet_a": (
    (933, 'n07697313', 'cheeseburger'),
    (404, 'n02690373', 'airliner'),
    (805, 'n04254680', 'soccer ball'),
    (920, 'n06874185', 'traffic light'),
    (954, 'n07753592', 'banana'),
    (953, 'n07753275', 'pineapple'),
    (949, 'n07745940', 'strawberry'),
    (796, 'n04229816', 'ski mask'),
    (963, 'n07873807', 'pizza, pizza pie'),
    (721, 'n03938244', 'pillow'),
    (550, 'n03297495', 'espresso maker'),
    (340, 'n02391049', 'zebra'),
    (679, 'n03814906', 'necklace'),
    (658, 'n03775071', 'mitten'),
    (51, 'n01704323', 'triceratops'),
    (629, 'n03676483', 'lipstick'),
    (713, 'n03924679', 'photocopier'),
    (896, 'n04553703', 'washbasin'),
    (767, 'n04116512', 'rubber eraser'),
    (514, 'n03124043', 'cowboy boot'),
    (697, 'n03877472', 'pajama'),
    (838, 'n04357314', 'sunscreen'),
    (437, 'n02814860', 'lighthouse'),
    (522, 'n03134739', 'croquet ball'),
    (665, 'n03785016', 'moped'),
    (413, 'n02749479', 'assault rifle'),
    (596, 'n03498962', 'hatchet'),
    (785, 'n04162706', 'seat belt'),
    (398, 'n02666196', 'abacus'),
    (604, 'n03544143', 'hourglass'),
    (917, 'n06596364', 'comic book'),
    (966, 'n07892512', 'red wine'),
    (804, 'n04254120', 'soap dispenser'),
    (905, 'n04590129', 'window shade'),
    (756, 'n04049303', 'rain barrel'),
    (971, 'n09229709', 'bubble'),
    (540, 'n03240683', 'drilling platform'),
    (719, 'n03935335', 'piggy bank'),
    (752, 'n04039381', 'racket'),
    (919, 'n06794110', 'street sign'),
    (419, 'n02786058', 'band aid'),
    (932, 'n07695742', 'pretzel'),
    (926, 'n07590611', 'hot pot'),
    (982, 'n10148035', 'groom'),
    (863, 'n04458633', 'totem pole'),
    (868, 'n04476259', 'tray'),
    (584, 'n03476684', 'hair slide'),
    (592, 'n03492542', 'hard disk'),
    (769, 'n04118776', 'rule'),
    (545, 'n03271574', 'electric fan'),
    ),
    "inet_b": (
    (589, 'n03483316', 'hand blower'),
    (696, 'n03876231', 'paintbrush'),
    (902, 'n04579432', 'whistle'),
    (701, 'n03888257', 'parachute'),
    (851, 'n04404412', 'television'),
    (491, 'n03000684', 'chain saw'),
    (512, 'n03109150', 'bottle screw'),
    (621, 'n03649909', 'lawn mower'),
    (950, 'n07747607', 'orange'),
    (937, 'n07714990', 'broccoli'),
    (974, 'n09288635', 'geyser'),
    (973, 'n09256479', 'coral reef'),
    (776, 'n04141076', 'saxophone'),
    (846, 'n04380533', 'table lamp'),
    (575, 'n03445924', 'golfcart'),
    (763, 'n04086273', 'six-gun'),
    (531, 'n03197337', 'digital watch'),
    (488, 'n02999410', 'chain'),
    (743, 'n04005630', 'prison'),
    (645, 'n03733131', 'maypole'),
    (535, 'n03208938', 'disk brake'),
    (412, 'n02747177', 'trash can'),
    (635, 'n03706229', 'magnetic compass'),
    (987, 'n12144580', 'corn'),
    (948, 'n07742313', 'Granny Smith'),
    (812, 'n04266014', 'space shuttle'),
    (977, 'n09421951', 'sandbar'),
    (430, 'n02802426', 'basketball'),
    (605, 'n03584254', 'iPod'),
    (836, 'n04355933', 'sunglass'),
    (150, 'n02077923', 'sea lion'),
    (539, 'n03223299', 'doormat'),
    (647, 'n03733805', 'measuring cup'),
    (477, 'n02966687', "carpenter's kit"),
    (910, 'n04597913', 'wooden spoon'),
    (693, 'n03873416', 'paddle'),
    (999, 'n15075141', 'toilet tissue'),
    (496, 'n03026506', 'Christmas stocking'),
    (924, 'n07583066', 'guacamole'),
    (927, 'n07613480', 'trifle'),
    (903, 'n04584207', 'wig'),
    (652, 'n03763968', 'military uniform'),
    (922, 'n07565083', 'menu'),
    (930, 'n07684084', 'French loaf'),
    (578, 'n03450230', 'gown'),
    (925, 'n07584110', 'consomme'),
    (733, 'n03976657', 'pole'),
    (967, 'n07920052', 'espresso'),
    (830, 'n04336792', 'stretcher'),
    (959, 'n07831146', 'carbonara'),
    ),
}
IMAGENET_NUM_CLASSES = 1000


def coarse_split(name: str, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """INet-A / INet-B as a split of ImageNet-1k (class index = position of the sorted wnid, as in
    the ImageNet folder layout): `id` the split's 50 classes; `details.ood_split` the other split's
    50 (the paper's fourth OOD set; build it with that split's `id` part)."""
    if name not in INET_SPLITS:
        raise DataError(f"unknown coarse split {name!r}; known: {', '.join(INET_SPLITS)}")
    other = next(n for n in INET_SPLITS if n != name)
    details = {"wnids": [w for _, w, _ in INET_SPLITS[name]], "ood_split": other,
               "ood_split_ids": sorted(c for c, _, _ in INET_SPLITS[other])}
    return make_split("imagenet", IMAGENET_NUM_CLASSES, [c for c, _, _ in INET_SPLITS[name]], "coarse", details,
                      class_names)
