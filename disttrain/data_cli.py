"""`disttrain shards ...` and `disttrain splits ...`: turning datasets on disk into shard splits.

    disttrain shards build cub /data/CUB_200_2011 shards/bird/train --split train --split-file bird.json --part id
    disttrain shards build webvision /data/webvision shards/webvision-dog --benchmark-exclusions dog \
        --wordnet-is-a /data/imagenet/wordnet.is_a.txt --wordnet-words /data/imagenet/words.txt --workers 32
    disttrain shards verify shards/bird/train
    disttrain shards index shards/foreign/train    # sample indexes for a split written without them
    disttrain splits rank --model runs/train_classifier/cub-all --data shards/cub-all/test --benchmark bird \
        --out bird.json
    disttrain splits partition --cmg 10class:1 --out cifar10-p1.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from disttrain.data import splits as split_lib
from disttrain.data.class_filter import BENCHMARK_EXCLUSIONS, ClassFilter, WordNet, benchmark_filter, read_id_list
from disttrain.data.layouts import layout_names, read_layout
from disttrain.data.sharding import ShardingOptions, build_split, index_split, verify_split
from disttrain.data.shards import DataError


def _ids(spec: str | None) -> tuple[str, ...]:
    return tuple(read_id_list(spec)) if spec else ()


def _class_filter(args: argparse.Namespace, listing) -> tuple[ClassFilter | None, dict]:
    """The filter the options ask for (None: keep every class) and provenance for the manifest."""
    include_ids = _ids(args.include_ids)
    provenance: dict = {}
    if args.split_file:
        split = split_lib.read_split(args.split_file)
        if split["num_classes"] != len(listing.classes):
            raise DataError(f"{args.split_file} splits {split['num_classes']} classes but {listing.layout} "
                            f"{listing.root} has {len(listing.classes)}: it was made for another dataset")
        include_ids += tuple(listing.class_ids[i] for i in split[args.part])
        provenance = {"split_file": str(args.split_file), "part": args.part}
    flt = ClassFilter(include_ids=include_ids, include_names=_ids(args.include_names),
                      exclude_ids=_ids(args.exclude_ids), exclude_descendants_of=_ids(args.exclude_descendants_of),
                      exclude_keywords=_ids(args.exclude_keywords))
    if args.benchmark_exclusions:
        bench = benchmark_filter(args.benchmark_exclusions, hierarchy=bool(args.wordnet_is_a))
        flt = replace(flt, exclude_ids=flt.exclude_ids + bench.exclude_ids,
                      exclude_descendants_of=flt.exclude_descendants_of + bench.exclude_descendants_of,
                      exclude_keywords=flt.exclude_keywords + bench.exclude_keywords)
        provenance["benchmark_exclusions"] = args.benchmark_exclusions
    return (flt if any(flt.options().values()) else None), provenance


def shards_build(args: argparse.Namespace) -> None:
    if args.part and not args.split_file:
        raise DataError("--part needs --split-file")
    listing = read_layout(args.layout, args.root, args.split)
    flt, provenance = _class_filter(args, listing)
    extra: dict = {}
    if flt is not None:
        wordnet = WordNet.load(args.wordnet_is_a, args.wordnet_words) if args.wordnet_is_a else None
        listing, report = flt.apply(listing, wordnet)
        extra["filter"] = {**report, **provenance}
        excluded = report.get("excluded", [])
        print(f"class filter: kept {report['classes_kept']} of {report['classes_before']} classes, "
              f"{report['samples_after']} of {report['samples_before']} samples"
              + (f"; excluded e.g. {', '.join(e['name'] for e in excluded[:8])}" if excluded else ""))
    options = ShardingOptions(samples_per_shard=args.samples_per_shard,
                              max_shard_bytes=int(args.max_shard_mb * 2**20),
                              shuffle_seed=None if args.keep_order else args.shuffle_seed,
                              resize=args.resize, workers=args.workers)
    manifest = build_split(listing, args.out, options, extra=extra)
    print(f"{args.out}: {manifest['num_samples']} samples of {len(manifest['classes'])} classes in "
          f"{len(manifest['shards'])} shards; {manifest.get('num_skipped', 0)} unreadable sources skipped"
          + (" (listed in the manifest)" if manifest.get("num_skipped") else ""))


def shards_verify(args: argparse.Namespace) -> None:
    report = verify_split(args.split, workers=args.workers)
    for problem in report["problems"][:50]:
        print(f"problem: {problem}")
    print(f"{report['root']}: {report['num_shards']} shards, {report['num_samples']} samples, "
          f"{len(report['problems'])} problems")
    if report["problems"]:
        raise SystemExit(1)


def shards_index(args: argparse.Namespace) -> None:
    report = index_split(args.split)
    print(f"{report['root']}: {report['num_shards']} shards, {report['written']} sample indexes written")


def _predictions(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    if args.predictions:
        table = np.load(args.predictions)
        if "labels" not in table or not ({"probs", "logits"} & set(table.files)):
            raise DataError(f"{args.predictions} needs arrays `labels` and `probs` or `logits` (got {table.files})")
        probs = table["probs"] if "probs" in table else split_lib.softmax(table["logits"])
        return probs, table["labels"], None
    from disttrain.runtime.saved import predict_saved_classifier

    probs, labels, card = predict_saved_classifier(args.model, args.data, batch_size=args.batch_size)
    return probs, labels, card.classes


def splits_rank(args: argparse.Namespace) -> None:
    if bool(args.predictions) == bool(args.model):
        raise DataError("give either --predictions FILE.npz or --model RUN_DIR with --data SPLIT")
    if args.model and not args.data:
        raise DataError("--model needs --data: the test split of all classes to rank them on")
    probs, labels, names = _predictions(args)
    num_id = args.num_id
    if not num_id and args.benchmark:
        num_id = split_lib.benchmark_num_id(args.benchmark, probs.shape[1])
    if not num_id:
        raise DataError("how many ID classes? give --num-id N or --benchmark bird|dog|flower|car|aircraft")
    split = split_lib.rank_split(probs, labels, num_id, class_names=names, dataset=args.benchmark or "")
    split_lib.write_split(args.out, split)
    print(f"{args.out}: {len(split['id'])} ID classes (highest S(c) = accuracy - mean entropy), "
          f"{len(split['ood'])} held out")


def splits_partition(args: argparse.Namespace) -> None:
    if args.cmg:
        kind, _, partition = args.cmg.partition(":")
        split = split_lib.cmg_split(kind, int(partition or 0))
    elif args.known:
        if not args.num_classes:
            raise DataError("--known needs --num-classes")
        split = split_lib.partition_split(args.num_classes, [int(c) for c in read_id_list(args.known)])
    elif args.random:
        if not args.num_classes:
            raise DataError("--random needs --num-classes")
        split = split_lib.random_split(args.num_classes, args.random, args.seed)
    else:
        raise DataError("choose one of --cmg KIND:P, --known LIST, --random K")
    split_lib.write_split(args.out, split)
    print(f"{args.out}: ID classes {split['id']}")


def splits_coarse(args: argparse.Namespace) -> None:
    split = split_lib.coarse_split(args.name)
    split_lib.write_split(args.out, split)
    print(f"{args.out}: {args.name} = {len(split['id'])} ImageNet-1k classes as ID (mixupoe.txt App. H.1); "
          f"its OOD counterpart is {split['details']['ood_split']}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help="write / check WebDataset shard splits").add_subparsers(
        dest="action", required=True)
    p = shards.add_parser("build", help="convert a dataset on disk into a shard split (resumable)")
    p.add_argument("layout", choices=layout_names())
    p.add_argument("root", help="the dataset's root folder, as distributed")
    p.add_argument("out", help="output folder of the split")
    p.add_argument("--split", default="all", help="the dataset's split (train/test/...; see the layout)")
    p.add_argument("--split-file", help="an ID/OOD split file (`disttrain splits`); with --part")
    p.add_argument("--part", choices=["id", "ood"], help="which classes of --split-file to keep")
    p.add_argument("--include-ids", help="keep only these class ids (comma list or @file)")
    p.add_argument("--include-names", help="keep only these class names (comma list or @file)")
    p.add_argument("--exclude-ids", help="drop these class ids / wnids (comma list or @file)")
    p.add_argument("--exclude-descendants-of", help="drop classes under these wnids (needs --wordnet-is-a)")
    p.add_argument("--exclude-keywords", help="drop classes whose names contain these words")
    p.add_argument("--benchmark-exclusions", choices=sorted(BENCHMARK_EXCLUSIONS),
                   help="MixupOE Sec. 5.1: drop what overlaps this benchmark (WordNet with --wordnet-is-a, "
                        "else keywords)")
    p.add_argument("--wordnet-is-a", help="ImageNet's wordnet.is_a.txt (parent child wnid per line)")
    p.add_argument("--wordnet-words", help="ImageNet's words.txt (wnid<TAB>names) for keyword matching")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-mb", type=float, default=0.0, help="also close a shard at this size (0: no limit)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0,
                       help="seed of the shuffle of samples across shards (default 0; recorded in the manifest)")
    order.add_argument("--keep-order", action="store_true",
                       help="keep the dataset's order (often sorted by class) instead of shuffling")
    p.add_argument("--resize", type=int, default=0, help="shorter side to N px, re-encoded (0: keep the bytes)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(fn=shards_build)
    p = shards.add_parser("verify", help="check every member decodes and counts match the manifest")
    p.add_argument("split")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(fn=shards_verify)
    p = shards.add_parser("index", help="write the sample index of every shard that lacks one (older splits)")
    p.add_argument("split")
    p.set_defaults(fn=shards_index)

    splits = sub.add_parser("splits", help="ID / OOD class splits").add_subparsers(dest="action", required=True)
    p = splits.add_parser("rank", help="MixupOE App. A: top classes by accuracy - mean prediction entropy")
    p.add_argument("--predictions", help=".npz with `labels` and `probs` (or `logits`) over all classes")
    p.add_argument("--model", help="run dir of a classifier trained on all classes")
    p.add_argument("--data", help="with --model: the test split (all classes) to rank on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--benchmark", choices=sorted(split_lib.BENCHMARK_ID_CLASSES), help="its number of ID classes")
    p.add_argument("--num-id", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=splits_rank)
    p = splits.add_parser("partition", help="fixed or random known/unknown partitions (CMG Sec. 4.1)")
    p.add_argument("--cmg", help="10class:P or tinyimagenet:P, P = 1..5")
    p.add_argument("--known", help="known class indices (comma list or @file)")
    p.add_argument("--random", type=int, default=0, help="K random known classes")
    p.add_argument("--num-classes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=splits_partition)
    p = splits.add_parser("coarse", help="MixupOE 5.5: the INet-A / INet-B ID splits of ImageNet-1k")
    p.add_argument("name", help=" or ".join(split_lib.INET_SPLITS))
    p.add_argument("--out", required=True)
    p.set_defaults(fn=splits_coarse)
