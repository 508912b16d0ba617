"""Class filter: WordNet subtrees, keywords, id/name lists, errors, report, relabelling."""

from __future__ import annotations

import json

import pytest

from disttrain.data.class_filter import (
    BENCHMARK_EXCLUSIONS,
    ClassFilter,
    WordNet,
    benchmark_filter,
    keyword_matches,
    read_id_list,
)
from disttrain.data.layouts import Listing, Record
from disttrain.data.shards import DataError

# A tiny hierarchy in ImageNet's layout ("parent child"), with made-up internal wnids.
IS_A = """\
n00000001 n00000010
n00000010 n01503061
n01503061 n01000001
n01000001 n01000002
n01000001 n01000003
n00000010 n02084071
n02084071 n02000001
n02000001 n02000002
n02084071 n02000003
n00000010 n02118333
n02118333 n02119022
n00000001 n03000001
n03000001 n02958343
n02958343 n04285008
n00000001 n07000001
n07000001 n07697537
"""
WORDS = """\
n01503061\tbird
n01000001\tfinch
n01000002\tgoldfinch, Carduelis carduelis
n01000003\thouse finch, linnet
n02084071\tdog, domestic dog, Canis familiaris
n02000002\tBoston bull, Boston terrier
n02000003\tChihuahua
n02119022\tred fox, Vulpes vulpes
n04285008\tsports car, sport car
n07697537\thotdog, hot dog, red hot
"""
# (wnid, class name, samples)
CLASSES = [("n01000002", "goldfinch", 2), ("n02000002", "Boston_bull", 2), ("n02119022", "red_fox", 3),
           ("n04285008", "sports_car", 1), ("n07697537", "hotdog", 2), ("n01000003", "house_finch", 2),
           ("n02000003", "Chihuahua", 0)]


@pytest.fixture()
def listing() -> Listing:
    records = [Record(key=f"{name}_{k}", label=label)
               for label, (_, name, count) in enumerate(CLASSES) for k in range(count)]
    return Listing("webvision", "/data/webvision", "train", [c[1] for c in CLASSES], [c[0] for c in CLASSES],
                   records)


@pytest.fixture()
def wordnet(tmp_path) -> WordNet:
    (tmp_path / "wordnet.is_a.txt").write_text(IS_A)
    (tmp_path / "words.txt").write_text(WORDS)
    return WordNet.load(tmp_path / "wordnet.is_a.txt", tmp_path / "words.txt")


def names(listing: Listing) -> list[str]:
    return listing.classes


def test_wordnet_descendants_names_and_cycles(wordnet, tmp_path):
    assert wordnet.descendants("n02084071") == {"n02084071", "n02000001", "n02000002", "n02000003"}
    assert wordnet.descendants("n04285008") == {"n04285008"}  # a leaf is its own subtree
    assert wordnet.names("n07697537") == ("hotdog", "hot dog", "red hot")
    assert wordnet.names("n02000001") == ()
    assert wordnet.is_known("n02000001") and not wordnet.is_known("n09999999")
    with pytest.raises(DataError, match="n09999999"):
        wordnet.descendants("n09999999")
    (tmp_path / "cycle.txt").write_text("a b\nb c\nc a\nc d\n")
    assert WordNet.load(tmp_path / "cycle.txt").descendants("b") == {"a", "b", "c", "d"}


def test_wordnet_bad_files(tmp_path):
    with pytest.raises(DataError, match="wordnet.is_a.txt"):
        WordNet.load(tmp_path / "absent.txt")
    (tmp_path / "bad.txt").write_text("n1 n2\nn1 n2 n3\n")
    with pytest.raises(DataError, match=r"bad.txt:2"):
        WordNet.load(tmp_path / "bad.txt")


def test_descendants_exclusion_relabels_in_dataset_order(listing, wordnet):
    kept, report = ClassFilter(exclude_descendants_of=["n02084071"]).apply(listing, wordnet)
    assert names(kept) == ["goldfinch", "red_fox", "sports_car", "hotdog", "house_finch"]
    assert kept.class_ids == ["n01000002", "n02119022", "n04285008", "n07697537", "n01000003"]
    # records keep their order and get the new labels
    assert [(r.key, r.label) for r in kept.records] == [
        ("goldfinch_0", 0), ("goldfinch_1", 0), ("red_fox_0", 1), ("red_fox_1", 1), ("red_fox_2", 1),
        ("sports_car_0", 2), ("hotdog_0", 3), ("hotdog_1", 3), ("house_finch_0", 4), ("house_finch_1", 4)]
    excluded = {e["name"]: e["rules"] for e in report["excluded"]}
    assert excluded == {"Boston_bull": ["descendant of n02084071 (dog)"],
                        "Chihuahua": ["descendant of n02084071 (dog)"]}


def test_internal_node_removes_whole_subtree(listing, wordnet):
    kept, _ = ClassFilter(exclude_descendants_of=["n01503061"]).apply(listing, wordnet)  # bird > finch > ...
    assert names(kept) == ["Boston_bull", "red_fox", "sports_car", "hotdog", "Chihuahua"]


def test_keyword_whole_word_and_synonyms(listing, wordnet):
    assert keyword_matches("dog", "hot dog") and keyword_matches("DOG", "Maltese_dog")
    assert not keyword_matches("dog", "hotdog") and not keyword_matches("dog", "dogs")
    # without a WordNet only the class names are searched: "hotdog" is not the word "dog"
    kept, report = ClassFilter(exclude_keywords=["dog"]).apply(listing)
    assert len(kept.classes) == len(CLASSES) and report["excluded"] == []
    # with the names file, synonyms count: "domestic dog" is not a class, but "hot dog" is a synonym
    kept, report = ClassFilter(exclude_keywords=["dog"]).apply(listing, wordnet)
    assert [e["name"] for e in report["excluded"]] == ["hotdog"]
    # case-insensitive, underscores are spaces, synonyms ("Boston terrier")
    kept, report = ClassFilter(exclude_keywords=["TERRIER", "finch"]).apply(listing, wordnet)
    assert names(kept) == ["goldfinch", "red_fox", "sports_car", "hotdog", "Chihuahua"]
    # "goldfinch" is one word, but its wnid's synonyms do not contain "finch" either
    assert {e["name"]: e["rules"] for e in report["excluded"]} == {
        "Boston_bull": ["keyword 'TERRIER'"], "house_finch": ["keyword 'finch'"]}


def test_exclude_id_list_and_known_wnids(listing, wordnet):
    kept, report = ClassFilter(exclude_ids=["n04285008", "n07697537"]).apply(listing)
    assert names(kept) == ["goldfinch", "Boston_bull", "red_fox", "house_finch", "Chihuahua"]
    assert report["rules"] == {"exclude_ids n04285008": 1, "exclude_ids n07697537": 1}
    # a wnid the WordNet knows but the dataset lacks is fine (it removes nothing)
    kept, report = ClassFilter(exclude_ids=["n02118333"]).apply(listing, wordnet)
    assert len(kept.classes) == len(CLASSES) and report["rules"] == {"exclude_ids n02118333": 0}


def test_unknown_wnid_errors(listing, wordnet):
    with pytest.raises(DataError, match="exclude_ids.*n09999999"):
        ClassFilter(exclude_ids=["n09999999"]).apply(listing, wordnet)
    with pytest.raises(DataError, match="exclude_ids.*n02118333"):  # unknown without the WordNet
        ClassFilter(exclude_ids=["n02118333"]).apply(listing)
    with pytest.raises(DataError, match="exclude_descendants_of.*n09999999"):
        ClassFilter(exclude_descendants_of=["n09999999"]).apply(listing, wordnet)
    with pytest.raises(DataError, match="include_ids.*n02118333"):  # include: must be a class of the listing
        ClassFilter(include_ids=["n02118333"]).apply(listing, wordnet)
    with pytest.raises(DataError, match="include_names.*'robin'"):
        ClassFilter(include_names=["robin"]).apply(listing)


def test_descendants_without_hierarchy(listing):
    with pytest.raises(DataError, match="needs the WordNet hierarchy.*wordnet.is_a.txt"):
        ClassFilter(exclude_descendants_of=["n02084071"]).apply(listing)


def test_include_keeps_dataset_order(listing):
    kept, report = ClassFilter(include_ids=["n01000003", "n02119022"], include_names=["GOLDFINCH"]).apply(listing)
    assert names(kept) == ["goldfinch", "red_fox", "house_finch"]  # dataset order, not the list's
    assert sorted({r.label for r in kept.records}) == [0, 1, 2]
    assert report["classes_kept"] == 3
    assert all(e["rules"] == ["not in include_ids/include_names"] for e in report["excluded"])


def test_zero_left_errors(listing, wordnet):
    with pytest.raises(DataError, match="removes every class"):
        ClassFilter(exclude_descendants_of=["n00000001"]).apply(listing, wordnet)
    with pytest.raises(DataError, match="none of them has a sample"):
        ClassFilter(include_ids=["n02000003"]).apply(listing)


def test_report_contents(listing, wordnet):
    flt = ClassFilter(exclude_descendants_of=["n02084071"], exclude_keywords=["sport car"])
    kept, report = flt.apply(listing, wordnet)
    assert json.loads(json.dumps(report)) == report
    assert report["options"] == {"include_ids": [], "include_names": [], "exclude_ids": [],
                                 "exclude_descendants_of": ["n02084071"], "exclude_keywords": ["sport car"]}
    assert report["classes_before"] == 7 and report["classes_kept"] == 4 == len(kept.classes)
    assert report["samples_before"] == 12 and report["samples_after"] == 9 == len(kept.records)
    assert report["excluded"] == [
        {"index": 1, "id": "n02000002", "name": "Boston_bull", "rules": ["descendant of n02084071 (dog)"]},
        {"index": 3, "id": "n04285008", "name": "sports_car", "rules": ["keyword 'sport car'"]},
        {"index": 6, "id": "n02000003", "name": "Chihuahua", "rules": ["descendant of n02084071 (dog)"]}]
    assert report["rules"] == {"descendant of n02084071 (dog)": 2, "keyword 'sport car'": 1}


def test_options_accept_a_single_string():
    assert ClassFilter(exclude_ids="n1", exclude_keywords=[" dog ", ""]).options()["exclude_keywords"] == ["dog"]
    assert ClassFilter(exclude_ids="n1").exclude_ids == ("n1",)


def test_read_id_list(tmp_path):
    assert read_id_list("n1, n2,,n3 ,n1") == ["n1", "n2", "n3"]
    (tmp_path / "ids.txt").write_text("# dogs\nn02084071\n\nn02115335  # wild dog\n")
    assert read_id_list(f"@{tmp_path / 'ids.txt'}") == ["n02084071", "n02115335"]
    with pytest.raises(DataError, match="absent.txt"):
        read_id_list(f"@{tmp_path / 'absent.txt'}")


def test_benchmark_filters(listing, wordnet, tmp_path):
    assert set(BENCHMARK_EXCLUSIONS) == {"bird", "dog", "flower", "car", "aircraft", "inet_a", "inet_b"}
    assert benchmark_filter("bird").exclude_descendants_of == ("n01503061",)
    assert "n02958343" in benchmark_filter("car").exclude_descendants_of
    assert benchmark_filter("flower").exclude_descendants_of[0] == "n11669921"
    assert benchmark_filter("aircraft").exclude_descendants_of[0] == "n02686568"
    assert benchmark_filter("dog", hierarchy=False).exclude_keywords[0] == "dog"
    with pytest.raises(DataError, match="known: bird, dog"):
        benchmark_filter("fish")
    # the dog filter on the tiny hierarchy, extended with the other dog roots
    extra = "n00000010 n02115335\nn00000001 n03218198\nn00000001 n03803284\n"
    (tmp_path / "full.txt").write_text(IS_A + extra)
    kept, _ = benchmark_filter("dog").apply(listing, WordNet.load(tmp_path / "full.txt"))
    assert names(kept) == ["goldfinch", "red_fox", "sports_car", "hotdog", "house_finch"]
    # keyword fallback: the breeds by name
    kept, _ = benchmark_filter("dog", hierarchy=False).apply(listing)
    assert names(kept) == ["goldfinch", "red_fox", "sports_car", "hotdog", "house_finch"]
