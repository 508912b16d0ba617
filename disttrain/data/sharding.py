"""Converting a dataset listing into a shard split (`disttrain shards build / verify / index`).

The conversion is planned first: records, shuffled with a seed (0 unless told otherwise;
None keeps the listing's order, which is usually sorted by class), are packed into shards
of at most `samples_per_shard` samples and `max_shard_bytes` source bytes. Shuffling at
conversion is not what makes training class-mixed -- the readers draw samples at random
from the whole split (`disttrain.data.stream`) -- but it keeps every shard a fair sample of
the split for tools that read a few shards (previews, quick checks, partial copies).
The plan's fingerprint is kept in the output folder (`.plan.json`); each shard is
written atomically (temp file, rename), then its sample index (`NNNNNN.idx.npy`, see
`disttrain.data.shards`) and a small `.NNNNNN.tar.json` record of its contents, and the
manifest comes last. So:

- a re-run of the same conversion skips complete shards and writes only what is missing;
- an interrupted run leaves no shard a reader would accept (no manifest yet, temp files
  are removed at the next run);
- a run with different inputs or options into the same folder is refused.

Encoded bytes are kept as they are unless `resize` is asked for (shorter side to
`resize` px, re-encoded as JPEG). Each image is decoded once while writing: unreadable
or undecodable sources are skipped and listed in the manifest (`skipped`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from disttrain import files
from disttrain.data.layouts import Listing, Record
from disttrain.data.shards import (MANIFEST, DataError, ShardSplit, make_sample, sha256_file, shard_name,
                                   write_manifest, write_shard)
from disttrain.data.tarindex import ShardIndex, index_name, scan_shard, write_index

PLAN = ".plan.json"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True)
class ShardingOptions:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 0  # 0: no byte limit
    shuffle_seed: int | None = 0  # None: the listing's order (often sorted by class)
    resize: int = 0  # 0: original bytes; N: shorter side to N px, re-encoded as JPEG
    jpeg_quality: int = 95
    workers: int = 1

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise DataError(f"samples per shard must be >= 1 (got {self.samples_per_shard})")
        if self.max_shard_bytes < 0 or self.resize < 0 or self.workers < 1:
            raise DataError("max shard bytes and resize must be >= 0, workers >= 1")


def tar_key(key: str) -> str:
    """A record key as a WebDataset key: no dots (they separate key and extension) or spaces."""
    return _KEY_UNSAFE.sub("_", key).strip("/")


def _source_size(record: Record) -> int:
    return os.path.getsize(record.path) if record.path is not None else int(record.pixels.nbytes)


def plan_shards(listing: Listing, options: ShardingOptions) -> list[list[int]]:
    """Record indices per shard."""
    order = list(range(len(listing.records)))
    if options.shuffle_seed is not None:
        random.Random(options.shuffle_seed).shuffle(order)
    shards: list[list[int]] = [[]]
    size = 0
    for index in order:
        nbytes = _source_size(listing.records[index]) if options.max_shard_bytes else 0
        full = len(shards[-1]) >= options.samples_per_shard or (
            options.max_shard_bytes and size + nbytes > options.max_shard_bytes)
        if full and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards if shards[0] else []


def _fingerprint(listing: Listing, plan: list[list[int]], options: ShardingOptions) -> str:
    content = {"source": [listing.layout, listing.root, listing.split], "classes": listing.classes,
               "class_ids": listing.class_ids, "options": {**asdict(options), "workers": None},
               "shards": [[listing.records[i].key for i in shard] for shard in plan]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _encode(record: Record, options: ShardingOptions) -> tuple[bytes, str]:
    """The bytes to store, after checking they decode; raises OSError/ValueError otherwise."""
    data, ext = record.encoded()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if not options.resize:
            return data, ext
        image = img.convert("RGB")
    scale = options.resize / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=options.jpeg_quality)
    return buf.getvalue(), "jpg"


# Worker state: sent once to each worker process (not with every task). Workers are spawned,
# not forked: forking a process that already runs threads (torch's, a tracker's) can deadlock.
_JOB: dict[str, Any] = {}


def _set_job(job: dict[str, Any]) -> None:
    _JOB.update(job)


def _write_one(index: int) -> dict[str, Any]:
    listing, plan, options, out = _JOB["listing"], _JOB["plan"], _JOB["options"], _JOB["out"]
    samples, skipped, counts = [], [], [0] * len(listing.classes)
    for i in plan[index]:
        record = listing.records[i]
        source = record.meta.get("source", record.path or record.key)
        try:
            data, ext = _encode(record, options)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            skipped.append({"source": str(source), "reason": f"{type(err).__name__}: {err}"})
            continue
        meta = {"source": str(source), "class": listing.classes[record.label] if record.label >= 0 else None,
                "class_id": listing.class_ids[record.label] if record.label >= 0 else None, **record.meta}
        samples.append(make_sample(tar_key(record.key), data, ext, record.label, meta))
        if record.label >= 0:
            counts[record.label] += 1
    entry = write_shard(out, index, samples) if samples else {"name": shard_name(index), "num_samples": 0}
    done = {**entry, "class_counts": counts, "skipped": skipped}
    files.write_json(out / f".{shard_name(index)}.json", done)
    return done


def _completed(out: Path, index: int) -> dict[str, Any] | None:
    record = out / f".{shard_name(index)}.json"
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    if done["num_samples"] and not all((out / done.get(k, "-")).is_file() for k in ("name", "index")):
        return None  # the shard or its index is gone (or the record predates sample indexes)
    return done


def _claim(out: Path, fingerprint: str, num_shards: int) -> None:
    """Make `out` ours for this plan, or refuse it when it holds something else."""
    plan_file = out / PLAN
    if plan_file.is_file():
        if json.loads(plan_file.read_text())["fingerprint"] != fingerprint:
            raise DataError(f"{out} holds shards of a different conversion (other source, classes or options); "
                            f"write to a new folder, or delete {out} to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and was not written by `disttrain shards build`; choose an empty or "
                        f"new output folder")
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(plan_file, {"fingerprint": fingerprint, "num_shards": num_shards})
    for stale in out.glob(".*.tmp"):
        stale.unlink()  # left by an interrupted run


def build_split(listing: Listing, out: str | os.PathLike, options: ShardingOptions,
                extra: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Write `listing` as a shard split into `out`; returns the manifest."""
    options.check()
    out = Path(out)
    if not listing.records:
        raise DataError(f"nothing to write into {out}: the listing has no samples (check the class filters)")
    dupes = [k for k, n in Counter(tar_key(r.key) for r in listing.records).items() if n > 1]
    if dupes:
        raise DataError(f"{listing.layout} records have duplicate keys once made WebDataset-safe: {dupes[:3]}")
    plan = plan_shards(listing, options)
    fingerprint = _fingerprint(listing, plan, options)
    _claim(out, fingerprint, len(plan))
    if (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())  # this very conversion is complete

    done = {i: d for i in range(len(plan)) if (d := _completed(out, i)) is not None}
    todo = [i for i in range(len(plan)) if i not in done]
    started = time.perf_counter()
    job = {"listing": listing, "plan": plan, "options": options, "out": out}
    _set_job(job)
    try:
        if options.workers > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(options.workers, _set_job, (job,)) as pool:
                for n, result in enumerate(pool.imap_unordered(_write_one, todo), 1):
                    done[_shard_index(result["name"])] = result
                    _report(progress, n, len(todo), len(done), len(plan), started)
        else:
            for n, index in enumerate(todo, 1):
                done[index] = _write_one(index)
                _report(progress, n, len(todo), len(done), len(plan), started)
    finally:
        _JOB.clear()
    return _finish(listing, out, options, [done[i] for i in range(len(plan))], fingerprint, extra or {})


def _shard_index(name: str) -> int:
    return int(name.split(".")[0])


def _report(progress: bool, n: int, todo: int, done: int, total: int, started: float) -> None:
    if progress and (n == todo or n % max(1, todo // 20) == 0):
        print(f"shards: {done}/{total} written ({n / (time.perf_counter() - started):.1f} shards/s)", flush=True)


def _finish(listing: Listing, out: Path, options: ShardingOptions, shards: list[dict[str, Any]], fingerprint: str,
            extra: dict[str, Any]) -> dict[str, Any]:
    written = [s for s in shards if s["num_samples"]]
    skipped = [item for s in shards for item in s["skipped"]]
    if not written:
        raise DataError(f"no sample of {listing.layout} {listing.root} could be read ({len(skipped)} skipped, e.g. "
                        f"{skipped[0]['source']}: {skipped[0]['reason']})")
    class_counts = [sum(s["class_counts"][c] for s in shards) for c in range(len(listing.classes))]
    entries = [{k: s[k] for k in ("name", "num_samples", "size", "sha256", "index", "class_counts")} for s in written]
    return write_manifest(
        out, listing.classes, entries, class_counts, class_ids=listing.class_ids,
        source={"layout": listing.layout, "root": listing.root, "split": listing.split},
        options={k: v for k, v in asdict(options).items() if k != "workers"}, plan=fingerprint,
        num_skipped=len(skipped), skipped=skipped[:1000], **extra)


# --------------------------------------------------------------------------- verification


def _verify_shard(args: tuple[str, dict[str, Any], int]) -> tuple[list[str], list[int]]:
    root, entry, num_classes = Path(args[0]), args[1], args[2]
    path, problems, counts = root / entry["name"], [], [0] * num_classes
    if not path.is_file():
        return [f"{entry['name']}: missing"], counts
    size = path.stat().st_size
    if "size" in entry and size != entry["size"]:
        problems.append(f"{entry['name']}: {size} bytes, the manifest says {entry['size']} (the file changed or was "
                        f"cut short)")
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 differs from the manifest (the file changed or is damaged)")
    problems += _index_problems(root, entry, path, size)
    seen = 0
    try:
        for sample in wds.tarfile_to_samples()([{"url": str(path)}]):
            seen += 1
            ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in sample), None)
            if ext is None or "cls" not in sample:
                problems.append(f"{entry['name']}: sample {sample.get('__key__')} lacks an image or cls member")
                continue
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    img.load()
            except (OSError, ValueError, SyntaxError) as err:
                problems.append(f"{entry['name']}: sample {sample['__key__']} does not decode ({err})")
            label = int(sample["cls"])
            if label >= num_classes:
                problems.append(f"{entry['name']}: sample {sample['__key__']} has class {label} >= {num_classes}")
            elif label >= 0:
                counts[label] += 1
    except Exception as err:  # a damaged tar: reported, not raised
        problems.append(f"{entry['name']}: unreadable after {seen} samples ({type(err).__name__}: {err})")
    if seen != entry["num_samples"]:
        problems.append(f"{entry['name']}: {seen} samples, the manifest says {entry['num_samples']}")
    return problems, counts


def _index_problems(root: Path, entry: dict[str, Any], path: Path, size: int) -> list[str]:
    """The shard's sample index against its tar headers (read again)."""
    scanned = scan_shard(path)
    problems = [f"{entry['name']}: {scanned.damage}"] if scanned.damage else []
    if "index" not in entry:
        return problems  # an older split: readers scan its headers (`disttrain shards index` writes indexes)
    stored = ShardIndex.load(root / entry["index"], size) if (root / entry["index"]).is_file() else None
    if stored is None:
        problems.append(f"{entry['name']}: its sample index {entry['index']} is missing or malformed")
    elif not stored.same_as(scanned):
        problems.append(f"{entry['name']}: its sample index {entry['index']} does not match the shard's headers")
    return problems


def verify_split(root: str | os.PathLike, workers: int = 1) -> dict[str, Any]:
    """Check every shard of a split: present, checksum, every member decodes, counts as in the manifest."""
    split = ShardSplit.open(root)
    jobs = [(str(split.root), entry, split.num_classes) for entry in split.manifest["shards"]]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_verify_shard, jobs)
    else:
        results = [_verify_shard(job) for job in jobs]
    problems = [p for shard_problems, _ in results for p in shard_problems]
    counts = [sum(c[i] for _, c in results) for i in range(split.num_classes)]
    expected = split.manifest.get("class_counts")
    if expected is not None and counts != list(expected):
        problems.append(f"class histogram {counts} differs from the manifest's {expected}")
    return {"root": str(split.root), "num_shards": len(jobs), "num_samples": split.num_samples,
            "problems": problems}


# --------------------------------------------------------------------------- indexing an existing split


def index_split(root: str | os.PathLike) -> dict[str, Any]:
    """Write the sample index of every shard that lacks a valid one (older or foreign splits), and
    record it and the shard's byte size in the manifest, so readers need not scan tar headers."""
    split = ShardSplit.open(root)
    manifest, written = split.manifest, 0
    for entry in manifest["shards"]:
        path, name = split.root / entry["name"], index_name(entry["name"])
        size, scanned = path.stat().st_size, scan_shard(path)
        stored = ShardIndex.load(split.root / name, size) if (split.root / name).is_file() else None
        if stored is None or not stored.same_as(scanned):
            write_index(split.root / name, scanned)
            written += 1
        if scanned.num_samples != entry["num_samples"]:
            print(f"{entry['name']}: holds {scanned.num_samples} samples, the manifest lists {entry['num_samples']} "
                  f"(left as it is: `disttrain shards verify` reports it)")
        entry.update(index=name, size=size)
    files.write_json(split.root / MANIFEST, manifest)
    return {"root": str(split.root), "num_shards": len(manifest["shards"]), "written": written}
