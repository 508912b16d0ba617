"""Choosing which classes of a dataset to keep: by id or name, by WordNet subtree, by keyword.

Two uses. Outlier exposure needs an outlier pool that shares nothing with the held-out
classes: MixupOE (Sec. 5.1) removes every dog image from WebVision for the Dog benchmark,
and for its ImageNet splits (App. H) filters WebVision "based on the WordNet hierarchy".
And experiments pick class subsets of a dataset by class id or name.

    wordnet = WordNet.load("wordnet.is_a.txt", "words.txt")
    pool, report = benchmark_filter("dog").apply(webvision_listing, wordnet)
    subset, report = ClassFilter(include_ids=read_id_list("@classes.txt")).apply(listing)

A filter keeps the listing's class order and relabels the kept classes 0..K-1
(`Listing.keep_classes`); the report says which classes went and which rule removed each.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from disttrain.data.layouts import Listing
from disttrain.data.shards import DataError

# --------------------------------------------------------------------------- WordNet


@dataclass(frozen=True)
class WordNet:
    """The WordNet noun hierarchy as ImageNet ships it, and optionally the synset names.

    `children` maps a wnid to its direct hyponyms; `words` maps a wnid to its synonyms.
    """

    children: Mapping[str, tuple[str, ...]]
    words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()

    @classmethod
    def load(cls, is_a_path: str | Path, words_path: str | Path | None = None) -> WordNet:
        """Read `wordnet.is_a.txt` (lines "parent_wnid child_wnid") and optionally `words.txt`
        (lines "wnid<TAB>name, synonym, ...")."""
        edges = _read_is_a(Path(is_a_path))
        words = _read_words(Path(words_path)) if words_path is not None else {}
        return cls.from_edges(edges, words)

    @classmethod
    def from_edges(cls, edges: Iterable[tuple[str, str]],
                   words: Mapping[str, Iterable[str]] | None = None) -> WordNet:
        """Build from (parent, child) pairs and an optional wnid -> names mapping."""
        children: dict[str, list[str]] = {}
        nodes: set[str] = set()
        for parent, child in edges:
            children.setdefault(parent, []).append(child)
            nodes.update((parent, child))
        names = {wnid: tuple(synonyms) for wnid, synonyms in (words or {}).items()}
        return cls({p: tuple(c) for p, c in children.items()}, names, frozenset(nodes))

    @property
    def has_words(self) -> bool:
        return bool(self.words)

    def is_known(self, wnid: str) -> bool:
        """Whether `wnid` appears in the hierarchy or in the names file."""
        return wnid in self.nodes or wnid in self.words

    def names(self, wnid: str) -> tuple[str, ...]:
        """The synonyms of `wnid` (empty without a names file or for an unnamed wnid)."""
        return self.words.get(wnid, ())

    def descendants(self, wnid: str) -> frozenset[str]:
        """`wnid` and every wnid below it, transitively (safe against cycles)."""
        if not self.is_known(wnid):
            raise DataError(f"wnid {wnid} is not in the WordNet hierarchy")
        seen = {wnid}
        stack = [wnid]
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return frozenset(seen)


def _content_lines(path: Path, what: str) -> Iterable[tuple[int, str]]:
    """(line number, stripped line) for every non-blank, non-comment line of `path`."""
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _read_is_a(path: Path) -> list[tuple[str, str]]:
    edges = []
    for number, line in _content_lines(path, "WordNet hierarchy file (ImageNet's wordnet.is_a.txt)"):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected 'parent_wnid child_wnid', got {line!r}")
        edges.append((parts[0], parts[1]))
    return edges


def _read_words(path: Path) -> dict[str, tuple[str, ...]]:
    words = {}
    for number, line in _content_lines(path, "WordNet names file (ImageNet's words.txt)"):
        wnid, sep, names = line.partition("\t")
        if not sep:
            wnid, _, names = line.partition(" ")
        synonyms = tuple(n.strip() for n in names.split(",") if n.strip())
        if not synonyms:
            raise DataError(f"{path}:{number}: expected 'wnid<TAB>name, synonym, ...', got {line!r}")
        words[wnid.strip()] = synonyms
    return words


# --------------------------------------------------------------------------- id lists


def read_id_list(spec: str) -> list[str]:
    """Ids from "a,b,c" or from "@path" (one id per line, `#` starts a comment); duplicates dropped."""
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise DataError(f"id list file {path} not found (a spec starting with '@' names a file)")
        items = [line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        items = spec.split(",")
    return list(dict.fromkeys(item.strip() for item in items if item.strip()))


# --------------------------------------------------------------------------- matching


def _normalise(text: str) -> str:
    """Lower case, underscores as spaces, runs of whitespace collapsed."""
    return " ".join(text.replace("_", " ").lower().split())


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Matches `keyword` as whole words in normalised text."""
    return re.compile(rf"(?<!\w){re.escape(_normalise(keyword))}(?!\w)")


def keyword_matches(keyword: str, text: str) -> bool:
    """Whether `keyword` occurs in `text` as whole words, ignoring case ("dog" is in "hot dog",
    "Maltese_dog" and "dog-sled", not in "hotdog" or "dogs")."""
    return _keyword_pattern(keyword).search(_normalise(text)) is not None


def _class_texts(listing: Listing, index: int, wordnet: WordNet | None) -> list[str]:
    """The normalised class name and, given a WordNet with names, all synonyms of its wnid."""
    texts = [listing.classes[index]]
    if wordnet is not None:
        texts.extend(wordnet.names(listing.class_ids[index]))
    return [_normalise(t) for t in texts]


# --------------------------------------------------------------------------- the filter


def _as_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(s for s in (str(item).strip() for item in items) if s)


@dataclass(frozen=True)
class ClassFilter:
    """Which classes of a listing to keep.

    Without `include_ids`/`include_names` every class starts kept; with them, only the
    named ones (ids exactly as in `Listing.class_ids`, names case-insensitively). Then
    the exclusions remove classes:

      exclude_ids              class ids (wnids) to drop
      exclude_descendants_of   wnids whose whole WordNet subtree is dropped (needs a WordNet)
      exclude_keywords         whole-word, case-insensitive matches against the class name
                               and, given a WordNet with names, every synonym of its wnid
    """

    include_ids: tuple[str, ...] = ()
    include_names: tuple[str, ...] = ()
    exclude_ids: tuple[str, ...] = ()
    exclude_descendants_of: tuple[str, ...] = ()
    exclude_keywords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))

    def options(self) -> dict[str, list[str]]:
        """The options as a JSON-able dict."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    def apply(self, listing: Listing, wordnet: WordNet | None = None) -> tuple[Listing, dict]:
        """The listing with only the kept classes (dataset order, relabelled), and a report."""
        self._check(listing, wordnet)
        rules = self._rules(listing, wordnet)
        reasons = {i: [name for name, matched in rules if i in matched] for i in range(len(listing.classes))}
        keep = [i for i, why in reasons.items() if not why]
        where = f"{listing.layout} {listing.split} ({len(listing.classes)} classes)"
        if not keep:
            raise DataError(f"the class filter removes every class of {where}; loosen its options "
                            f"{self.options()}")
        kept = listing.keep_classes(keep)
        if not kept.records:
            raise DataError(f"the class filter keeps {len(keep)} classes of {where} but none of them has a "
                            f"sample; check the include options {self.options()}")
        return kept, _report(self, listing, kept, rules, reasons)

    def kept_indices(self, classes: list[str], class_ids: list[str], wordnet: WordNet | None = None) -> list[int]:
        """Indices of the classes the filter keeps, from class names and ids alone (e.g. a
        shard manifest's, to filter a stream). Same checks as `apply`."""
        listing = Listing("manifest", "", "classes", list(classes), list(class_ids), [])
        self._check(listing, wordnet)
        removed = set().union(*(matched for _, matched in self._rules(listing, wordnet)))
        return [i for i in range(len(classes)) if i not in removed]

    # ---------------------------------------------------------------- validation

    def _check(self, listing: Listing, wordnet: WordNet | None) -> None:
        if self.exclude_descendants_of and wordnet is None:
            raise DataError("exclude_descendants_of needs the WordNet hierarchy: pass a WordNet loaded from "
                            "ImageNet's wordnet.is_a.txt (and words.txt for synonyms), or use exclude_ids / "
                            "exclude_keywords instead")
        listed = set(listing.class_ids)
        where = f"{listing.layout} {listing.split}"
        _fail_unknown("include_ids", [i for i in self.include_ids if i not in listed],
                      f"not class ids of {where}; its ids look like {listing.class_ids[:3]}")
        in_wordnet = f" nor in the WordNet ({'given' if wordnet is not None else 'none given'})"
        for option in ("exclude_ids", "exclude_descendants_of"):
            unknown = [i for i in getattr(self, option)
                       if i not in listed and not (wordnet is not None and wordnet.is_known(i))]
            _fail_unknown(option, unknown, f"neither class ids of {where}{in_wordnet}")
        names = {_normalise(n) for n in listing.classes}
        missing = [n for n in self.include_names if _normalise(n) not in names]
        if missing:
            close = {n: difflib.get_close_matches(n, listing.classes, n=3) for n in missing}
            raise DataError(f"include_names: no class of {where} is called {', '.join(map(repr, missing))} "
                            f"(closest names: {close}); names match case-insensitively, '_' = ' '")

    # ---------------------------------------------------------------- rules

    def _rules(self, listing: Listing, wordnet: WordNet | None) -> list[tuple[str, set[int]]]:
        """(rule description, indices of the classes it removes) for every rule in use."""
        indices = range(len(listing.classes))
        ids = listing.class_ids
        rules: list[tuple[str, set[int]]] = []
        if self.include_ids or self.include_names:
            wanted_ids, wanted_names = set(self.include_ids), {_normalise(n) for n in self.include_names}
            rules.append(("not in include_ids/include_names",
                          {i for i in indices
                           if ids[i] not in wanted_ids and _normalise(listing.classes[i]) not in wanted_names}))
        for wnid in self.exclude_ids:
            rules.append((f"exclude_ids {wnid}", {i for i in indices if ids[i] == wnid}))
        for root in self.exclude_descendants_of:
            subtree = wordnet.descendants(root) if wordnet.is_known(root) else frozenset({root})
            label = f"descendant of {root}" + (f" ({wordnet.names(root)[0]})" if wordnet.names(root) else "")
            rules.append((label, {i for i in indices if ids[i] in subtree}))
        texts = [_class_texts(listing, i, wordnet) for i in indices] if self.exclude_keywords else []
        for keyword in self.exclude_keywords:
            pattern = _keyword_pattern(keyword)
            rules.append((f"keyword {keyword!r}",
                          {i for i in indices if any(pattern.search(t) for t in texts[i])}))
        return rules


def _fail_unknown(option: str, unknown: list[str], why: str) -> None:
    if unknown:
        raise DataError(f"{option}: unknown class id(s) {', '.join(unknown)}: {why}; fix the ids, or pass the "
                        "WordNet files that define them")


def _report(flt: ClassFilter, before: Listing, after: Listing, rules: list[tuple[str, set[int]]],
            reasons: dict[int, list[str]]) -> dict:
    """A JSON-able account of what the filter did."""
    return {
        "options": flt.options(),
        "dataset": {"layout": before.layout, "split": before.split, "root": before.root},
        "classes_before": len(before.classes),
        "classes_kept": len(after.classes),
        "samples_before": len(before.records),
        "samples_after": len(after.records),
        "rules": {name: len(matched) for name, matched in rules},
        "excluded": [{"index": i, "id": before.class_ids[i], "name": before.classes[i], "rules": why}
                     for i, why in reasons.items() if why],
    }


# --------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class BenchmarkExclusion:
    """What to take out of the WebVision outlier pool for one fine-grained benchmark.

    `roots`: WordNet subtrees removed (a leaf class's subtree is the class itself).
    `keywords`: the fallback when no hierarchy file is at hand; approximate (see below).
    """

    roots: tuple[str, ...]
    keywords: tuple[str, ...]


# WebVision 1.0 has ImageNet-1k's classes, so the roots are chosen against those. The rule:
# remove the benchmark's category as WordNet defines it, plus the few ImageNet classes that
# WordNet files elsewhere but whose images are mostly of that category (the paper's intent is
# that nothing relevant to the held-out task leaks into the outliers; removing a class too
# many costs little). Keywords are only a fallback: they match class names (and synonyms if
# words.txt is given) and over-remove a few unrelated classes that share a word ("crane" the
# machine, "hen-of-the-woods", "hot dog", "freight car", "carpenter's plane", "rose hip").
BENCHMARK_EXCLUSIONS: dict[str, BenchmarkExclusion] = {
    "bird": BenchmarkExclusion(
        roots=("n01503061",),  # bird: all 59 ImageNet bird classes, cock .. albatross
        keywords=("bird", "cock", "hen", "ostrich", "finch", "brambling", "junco", "bunting", "robin", "bulbul",
                  "jay", "magpie", "chickadee", "ouzel", "kite", "eagle", "vulture", "owl", "grouse", "ptarmigan",
                  "prairie chicken", "peacock", "quail", "partridge", "African grey", "macaw", "cockatoo",
                  "lorikeet", "coucal", "bee eater", "hornbill", "hummingbird", "jacamar", "toucan", "drake",
                  "merganser", "goose", "swan", "stork", "spoonbill", "flamingo", "heron", "egret", "bittern",
                  "crane", "limpkin", "gallinule", "coot", "bustard", "turnstone", "sandpiper", "redshank",
                  "dowitcher", "oystercatcher", "pelican", "penguin", "albatross")),
    "dog": BenchmarkExclusion(
        roots=("n02084071",   # dog, domestic dog: the 118 ImageNet breeds (Stanford Dogs' classes among them)
               "n02115335",   # wild dog: dingo, dhole, African hunting dog
               "n03218198",   # dogsled: the images are sled-dog teams
               "n03803284"),  # muzzle: the images are dogs wearing muzzles
        # foxes, wolves and coyotes stay: the paper notes foxes remained in its filtered pool
        keywords=("dog", "puppy", "terrier", "retriever", "spaniel", "hound", "setter", "pointer", "sheepdog",
                  "poodle", "schnauzer", "collie", "pinscher", "mastiff", "bullmastiff", "bulldog", "corgi",
                  "husky", "malamute", "greyhound", "beagle", "basset", "bloodhound", "bluetick", "redbone",
                  "borzoi", "whippet", "saluki", "weimaraner", "vizsla", "Chihuahua", "Pekinese", "Shih-Tzu",
                  "papillon", "ridgeback", "Airedale", "cairn", "Dandie Dinmont", "Boston bull", "Lhasa",
                  "clumber", "springer", "kuvasz", "schipperke", "groenendael", "malinois", "briard", "kelpie",
                  "komondor", "Bouvier des Flandres", "Rottweiler", "German shepherd", "Doberman", "Appenzeller",
                  "EntleBucher", "boxer", "Great Dane", "Saint Bernard", "dalmatian", "basenji", "pug", "Leonberg",
                  "Newfoundland", "Great Pyrenees", "Samoyed", "Pomeranian", "chow", "keeshond",
                  "Brabancon griffon", "Pembroke", "Mexican hairless", "dingo", "dhole", "dogsled", "muzzle")),
    "flower": BenchmarkExclusion(
        roots=("n11669921",   # flower: daisy and every other bloom WordNet files under it
               "n12057211",   # yellow lady's slipper: an orchid, which WordNet files under monocots
               "n03991062"),  # pot, flowerpot: the images are mostly flowering pot plants
        keywords=("flower", "blossom", "daisy", "orchid", "lady's slipper", "lady-slipper", "flowerpot", "rose",
                  "tulip", "lily", "sunflower", "poppy")),
    "car": BenchmarkExclusion(
        roots=("n02958343",   # car, automobile: ambulance, beach wagon, cab, convertible, jeep, limousine,
                              # minivan, Model T, racer, sports car
               "n03930630",   # pickup (a truck in WordNet; Stanford Cars has pickups)
               "n03796401",   # moving van  } vans are trucks in WordNet; Stanford Cars has vans
               "n03977966",   # police van  }
               "n02974003",   # car wheel  } close-ups of cars
               "n03459775",   # grille     }
               "n02965783"),  # car mirror }
        keywords=("car", "automobile", "motorcar", "sedan", "coupe", "convertible", "limousine", "minivan", "jeep",
                  "cab", "taxi", "taxicab", "station wagon", "beach wagon", "Model T", "racer", "ambulance",
                  "pickup", "van", "grille")),
    "aircraft": BenchmarkExclusion(
        roots=("n02686568",   # aircraft: airliner, warplane, airship, balloon (WordNet: lighter-than-air craft)
               "n04592741",   # wing: the images are aircraft wings
               "n02687172"),  # aircraft carrier: deck photos full of aircraft
        keywords=("aircraft", "airplane", "aeroplane", "plane", "airliner", "jetliner", "jet", "warplane",
                  "fighter", "bomber", "biplane", "seaplane", "glider", "helicopter", "airship", "dirigible",
                  "blimp", "balloon", "wing")),
}

# mixupoe.txt App. H.2: "relevant images to INet-A/B are filtered out from WebVision based on the
# WordNet hierarchy". Each split's OOD test sets include the other split, so both leave the pool.
def _inet_exclusion() -> BenchmarkExclusion:
    from disttrain.data.splits import INET_SPLITS

    rows = [row for split in INET_SPLITS.values() for row in split]
    return BenchmarkExclusion(roots=tuple(wnid for _, wnid, _ in rows),
                              keywords=tuple(name.split(",")[0] for _, _, name in rows))


BENCHMARK_EXCLUSIONS["inet_a"] = BENCHMARK_EXCLUSIONS["inet_b"] = _inet_exclusion()


def benchmark_filter(name: str, hierarchy: bool = True) -> ClassFilter:
    """The outlier-pool filter for a fine-grained benchmark: its WordNet subtrees (needs a
    WordNet when applied) or, with `hierarchy=False`, its fallback keywords."""
    if name not in BENCHMARK_EXCLUSIONS:
        raise DataError(f"no outlier exclusions for benchmark {name!r}; known: {', '.join(BENCHMARK_EXCLUSIONS)}")
    exclusion = BENCHMARK_EXCLUSIONS[name]
    if hierarchy:
        return ClassFilter(exclude_descendants_of=exclusion.roots)
    return ClassFilter(exclude_keywords=exclusion.keywords)


def stream_classes(classes: list[str], class_ids: list[str], class_counts: list[int], *, benchmark: str = "",
                   exclude_ids: Iterable[str] = (), wordnet_dir: str = "") -> tuple[frozenset[int] | None, dict]:
    """The class indices an outlier stream keeps from a shard split's classes after a benchmark's
    exclusions and/or explicit ids (None: no exclusion asked), and a report. WordNet subtrees
    need `wordnet_dir` (wordnet.is_a.txt, optionally words.txt); without it the benchmark's
    keyword fallback applies. Nothing left is an error."""
    exclude_ids = tuple(exclude_ids)
    if not benchmark and not exclude_ids:
        return None, {}
    if not class_ids or len(class_ids) != len(classes):
        raise DataError("the outlier split records no class ids in its manifest, so classes cannot be excluded "
                        "at stream time; build it with `disttrain shards build ... --benchmark-exclusions NAME` "
                        "instead, and drop outliers.exclude_*")
    wordnet = None
    if wordnet_dir:
        words = Path(wordnet_dir) / "words.txt"
        wordnet = WordNet.load(Path(wordnet_dir) / "wordnet.is_a.txt", words if words.is_file() else None)
    filters = [ClassFilter(exclude_ids=exclude_ids)] if exclude_ids else []
    if benchmark:
        filters.append(benchmark_filter(benchmark, hierarchy=wordnet is not None))
    keep = set(range(len(classes)))
    for flt in filters:
        keep &= set(flt.kept_indices(classes, class_ids, wordnet))
    kept_samples = sum(class_counts[i] for i in keep) if class_counts else len(keep)
    if not keep or not kept_samples:
        raise DataError(f"the outlier exclusions (benchmark={benchmark or 'none'}, exclude_ids={list(exclude_ids)}) "
                        f"leave no class of the outlier split ({len(classes)} classes) with a sample; point "
                        f"outliers.root at a pool with other classes, or loosen the exclusions")
    excluded = sorted(set(range(len(classes))) - keep)
    report = {"benchmark": benchmark, "exclude_ids": list(exclude_ids), "hierarchy": wordnet is not None,
              "kept_classes": len(keep), "kept_samples": kept_samples,
              "excluded": [{"id": class_ids[i], "name": classes[i]} for i in excluded]}
    return frozenset(keep), report
