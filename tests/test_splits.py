"""ID/OOD splits: MixupOE's class ranking, CMG's partitions, random splits, split files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from disttrain.data.shards import DataError
from disttrain.data.splits import (
    BENCHMARK_ID_CLASSES,
    CMG_PARTITIONS,
    SPLIT_FORMAT,
    benchmark_num_id,
    class_ranking_scores,
    cmg_split,
    partition_split,
    random_split,
    rank_split,
    read_split,
    softmax,
    write_split,
)

# Two test samples per class; columns are the predicted distribution over 3 classes.
PROBS = np.array([
    [1.0, 0.0, 0.0],    # class 0: right, entropy 0
    [0.6, 0.4, 0.0],    # class 0: right, entropy -(.6 ln .6 + .4 ln .4) = 0.6730117
    [0.2, 0.8, 0.0],    # class 1: right, entropy -(.2 ln .2 + .8 ln .8) = 0.5004024
    [0.5, 0.25, 0.25],  # class 1: wrong (argmax 0), entropy .5 ln 2 + .5 ln 4 = 1.0397208
    [0.0, 0.0, 1.0],    # class 2: right, entropy 0
    [0.0, 0.0, 1.0],    # class 2: right, entropy 0
])
LABELS = np.array([0, 0, 1, 1, 2, 2])
# S(c) = accuracy - mean entropy
S0 = 1.0 - (0.0 + 0.6730117) / 2   # 0.6634942
S1 = 0.5 - (0.5004024 + 1.0397208) / 2   # -0.2700616
S2 = 1.0 - 0.0


def test_ranking_scores_by_hand():
    scores = class_ranking_scores(PROBS, LABELS)
    assert scores == pytest.approx([S0, S1, S2], abs=1e-6)
    assert scores[0] == pytest.approx(1 - (0.6 * math.log(1 / 0.6) + 0.4 * math.log(1 / 0.4)) / 2)


def test_rank_split_keeps_the_top_classes_in_dataset_order():
    split = rank_split(PROBS, LABELS, num_id=2, class_names=["a", "b", "c"], dataset="toy")
    assert split["id"] == [0, 2] and split["ood"] == [1]
    assert split["id_names"] == ["a", "c"] and split["ood_names"] == ["b"]
    assert split["details"]["ranking"] == [2, 0, 1]
    assert split["details"]["scores"] == pytest.approx([S0, S1, S2], abs=1e-6)
    assert split["details"]["accuracy"] == [1.0, 0.5, 1.0]
    assert split["details"]["samples_per_class"] == [2, 2, 2]
    assert split["method"] == "rank" and split["dataset"] == "toy" and split["format"] == SPLIT_FORMAT
    assert rank_split(PROBS, LABELS, num_id=1)["id"] == [2]


def test_ties_go_to_the_lower_index():
    probs = np.eye(4)[[0, 1, 2, 3]]  # every class right with entropy 0: S = 1 for all
    assert rank_split(probs, np.arange(4), num_id=2)["id"] == [0, 1]
    probs = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # class 0 always wrong
    split = rank_split(probs, np.array([0, 1, 2]), num_id=1)  # S = 0, 1, 0: class 1, then 0 before 2
    assert split["details"]["ranking"] == [1, 0, 2]


def test_logits():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [3.0, -2.0, 0.0], [-1.0, -1.0, 4.0]])
    labels = np.array([0, 1, 2, 2])
    assert class_ranking_scores(logits, labels, from_logits=True) == pytest.approx(
        class_ranking_scores(softmax(logits), labels))
    assert softmax(np.array([[1000.0, 1000.0]]))[0] == pytest.approx([0.5, 0.5])
    with pytest.raises(DataError, match="from_logits=True"):
        class_ranking_scores(logits, labels)


def test_missing_class_and_bad_inputs():
    with pytest.raises(DataError, match=r"classes \[1\] have no test samples"):
        class_ranking_scores(PROBS[[0, 1, 4, 5]], LABELS[[0, 1, 4, 5]])
    with pytest.raises(DataError, match="labels must lie"):
        class_ranking_scores(PROBS, LABELS + 1)
    with pytest.raises(DataError, match="num_id must be between 1 and 2"):
        rank_split(PROBS, LABELS, num_id=3)
    assert BENCHMARK_ID_CLASSES == {"bird": 100, "dog": 100, "flower": 90, "car": 100, "aircraft": 90}
    assert benchmark_num_id("flower", 102) == 90
    with pytest.raises(DataError):
        benchmark_num_id("aircraft", 90)


def test_cmg_partitions():
    assert CMG_PARTITIONS["10class"] == {1: (0, 1, 2, 3, 4, 5), 2: (1, 2, 3, 4, 5, 6), 3: (2, 3, 4, 5, 6, 7),
                                         4: (3, 4, 5, 6, 7, 8), 5: (4, 5, 6, 7, 8, 9)}
    starts = {1: 0, 2: 40, 3: 80, 4: 120, 5: 160}
    for partition, start in starts.items():
        assert CMG_PARTITIONS["tinyimagenet"][partition] == tuple(range(start, start + 20))
    split = cmg_split("10class", 3, dataset="cifar10")
    assert split["id"] == [2, 3, 4, 5, 6, 7] and split["ood"] == [0, 1, 8, 9] and split["dataset"] == "cifar10"
    split = cmg_split("tinyimagenet", 5)
    assert split["id"] == list(range(160, 180)) and len(split["ood"]) == 180 and split["num_classes"] == 200
    assert split["details"] == {"kind": "tinyimagenet", "partition": 5}
    with pytest.raises(DataError, match="1..5"):
        cmg_split("10class", 6)
    with pytest.raises(DataError, match="known: 10class, tinyimagenet"):
        cmg_split("cifar100", 1)


def test_partition_and_random_splits():
    split = partition_split(5, [4, 1])
    assert split["id"] == [1, 4] and split["ood"] == [0, 2, 3] and split["method"] == "partition"
    with pytest.raises(DataError, match="twice"):
        partition_split(5, [1, 1])
    with pytest.raises(DataError, match="outside"):
        partition_split(5, [1, 7])
    a, b = random_split(50, 10, seed=3), random_split(50, 10, seed=3)
    assert a == b and len(a["id"]) == 10 and a["id"] == sorted(a["id"]) and len(a["ood"]) == 40
    assert random_split(50, 10, seed=4)["id"] != a["id"]


def test_round_trip(tmp_path):
    split = rank_split(PROBS, LABELS, num_id=2, class_names=["a", "b", "c"], dataset="toy")
    path = write_split(tmp_path / "splits" / "toy.json", split)
    assert read_split(path) == split
    assert not list((tmp_path / "splits").glob(".*.tmp"))


@pytest.mark.parametrize("change, message", [
    ({"format": "other/1"}, "not a split file"),
    ({"id": [0, 1], "ood": [1, 2]}, r"classes \[1\] are both ID and OOD"),
    ({"ood": [1, 3]}, r"indices \[3\] outside 0..2"),
    ({"id": [-1]}, "outside"),
    ({"id": []}, "non-empty list"),
    ({"id": ["0"]}, "list of class indices"),
    ({"id_names": ["a", "b", "c"]}, "id_names has 3 names for 2 classes"),
    ({"num_classes": None}, "num_classes"),
])
def test_validation_errors(tmp_path, change, message):
    split = {**partition_split(3, [0, 2], dataset="toy"), **change}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=message):
        read_split(path)
    with pytest.raises(DataError, match=message):
        write_split(tmp_path / "other.json", split)


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_split(tmp_path / "bad.json")
    split = partition_split(3, [0])
    del split["ood"]
    (tmp_path / "partial.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match="missing ood"):
        read_split(tmp_path / "partial.json")


def test_inet_a_and_b_are_the_papers_coarse_splits(tmp_path):
    """mixupoe.txt App. H.1: 50 + 50 ImageNet classes, disjoint; each the other's OOD set."""
    from disttrain.data.class_filter import BENCHMARK_EXCLUSIONS
    from disttrain.data.splits import INET_SPLITS, coarse_split
    from disttrain.cli import main as cli_main

    a, b = INET_SPLITS["inet_a"], INET_SPLITS["inet_b"]
    assert len(a) == len(b) == 50 and not {w for _, w, _ in a} & {w for _, w, _ in b}
    assert (933, "n07697313", "cheeseburger") in a and (404, "n02690373", "airliner") in a
    assert (589, "n03483316", "hand blower") in b and (959, "n07831146", "carbonara") in b
    split = coarse_split("inet_b")
    assert split["id"] == sorted(c for c, _, _ in b) and len(split["ood"]) == 950
    assert split["details"]["ood_split_ids"] == sorted(c for c, _, _ in a)
    # the outlier pool loses both splits' classes
    assert set(BENCHMARK_EXCLUSIONS["inet_a"].roots) == {w for _, w, _ in a + b}
    out = tmp_path / "inet_a.json"
    cli_main(["splits", "coarse", "inet_a", "--out", str(out)])
    assert read_split(out)["id"] == sorted(c for c, _, _ in a)
    with pytest.raises(DataError, match="inet_a, inet_b"):
        coarse_split("inet_c")
