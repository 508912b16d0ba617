"""The built-in demo dataset: small, deterministic, generated in seconds, not trivial.

A "fine-grained" family of synthetic birds on textured backgrounds: every class has the
same body plan and differs only in small details (wing-bar colour, number of tail
stripes, crest), while pose, scale, body colour, lighting and background vary per image.
Ten classes are in-distribution (`train`, `test`); four more of the same family are held
out (`holdout`, the near-OOD set). `outliers` is a pool of unrelated scenes (random
polygons, lines and blobs: a stand-in for WebVision) for outlier exposure, and `far_ood`
a set of periodic textures, as unlike the birds as Textures is unlike CUB.

Layout: `<out>/demo.json` and one shard split per name (see `disttrain.data.shards`).
"""

from __future__ import annotations

import io
import math
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from disttrain import files
from disttrain.data.shards import ShardSplitWriter

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
WING_COLOURS = {"red": (200, 40, 40), "yellow": (225, 200, 40), "blue": (40, 80, 210)}
# (wing colour, tail stripes, crest) -> a species; the last four are the held-out ones
SPECIES = [
    ("red", 1, False), ("red", 2, False), ("red", 3, True), ("yellow", 1, True), ("yellow", 2, False),
    ("yellow", 3, False), ("blue", 1, False), ("blue", 2, True), ("blue", 3, False), ("red", 1, True),
    ("yellow", 2, True), ("blue", 1, True), ("red", 3, False), ("blue", 3, True),
]
NUM_ID_CLASSES = 10
SPLIT_SIZES = {"train": 200, "test": 50, "holdout": 50}  # per class
POOL_SIZES = {"outliers": 2000, "far_ood": 500}
SAMPLES_PER_SHARD = 125


def species_name(wing: str, stripes: int, crest: bool) -> str:
    return f"{wing}-wing_{stripes}-stripe{'_crested' if crest else ''}"


def _background(rng: random.Random, size: int) -> Image.Image:
    base = tuple(rng.randint(90, 200) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 9)):  # foliage-like blotches
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.08, size * 0.3)
        tint = tuple(max(0, min(255, c + rng.randint(-50, 50))) for c in base)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
    return img.filter(ImageFilter.GaussianBlur(size * 0.03))


def _bird(rng: random.Random, wing: str, stripes: int, crest: bool) -> Image.Image:
    s = IMAGE_SIZE * _SUPERSAMPLE
    img = _background(rng, s)
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    body = tuple(rng.randint(70, 150) for _ in range(3))
    cx, cy = s * 0.5, s * 0.52
    bw, bh = s * 0.28, s * 0.16
    draw.ellipse((cx - bw, cy - bh, cx + bw, cy + bh), fill=body)  # body
    hx, hy, hr = cx + bw * 0.9, cy - bh * 0.9, s * 0.11
    draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=body)  # head
    draw.polygon([(hx + hr * 0.8, hy - hr * 0.2), (hx + hr * 1.9, hy + hr * 0.1), (hx + hr * 0.8, hy + hr * 0.4)],
                 fill=(230, 170, 60))  # beak
    draw.ellipse((hx + hr * 0.2, hy - hr * 0.4, hx + hr * 0.5, hy - hr * 0.1), fill=(10, 10, 10))  # eye
    tail = [(cx - bw * 0.8, cy - bh * 0.3), (cx - bw * 1.7, cy - bh * 0.9), (cx - bw * 1.7, cy + bh * 0.7),
            (cx - bw * 0.8, cy + bh * 0.3)]
    draw.polygon(tail, fill=body)
    for i in range(stripes):  # the tail stripes: one of the fine details
        x = cx - bw * (1.05 + 0.22 * i)
        draw.line([(x, cy - bh * 0.7), (x, cy + bh * 0.6)], fill=(245, 245, 245), width=max(2, s // 22))
    wc = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in WING_COLOURS[wing])
    draw.ellipse((cx - bw * 0.45, cy - bh * 0.55, cx + bw * 0.35, cy + bh * 0.05), fill=wc)  # wing bar
    if crest:
        draw.polygon([(hx - hr * 0.7, hy - hr * 0.6), (hx - hr * 0.2, hy - hr * 2.4), (hx + hr * 0.4, hy - hr * 0.7)],
                     fill=tuple(max(0, c - 40) for c in body))
    layer = layer.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, center=(cx, cy))
    scale = rng.uniform(0.8, 1.05)
    size = int(s * scale)
    layer = layer.resize((size, size), Image.BILINEAR)
    offset = (int(rng.uniform(-0.08, 0.08) * s + (s - size) / 2), int(rng.uniform(-0.08, 0.08) * s + (s - size) / 2))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    img.paste(layer, offset, layer)
    return _finish(img, rng)


def _outlier_scene(rng: random.Random) -> Image.Image:
    s = IMAGE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        kind = rng.choice(("polygon", "line", "ellipse", "rect"))
        pts = [(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(rng.randint(3, 6))]
        if kind == "polygon":
            draw.polygon(pts, fill=colour)
        elif kind == "line":
            draw.line(pts, fill=colour, width=rng.randint(2, 12))
        else:
            (x0, y0), (x1, y1) = pts[0], pts[1]
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=colour)
    return _finish(img, rng)


def _texture(rng: random.Random) -> Image.Image:
    s = IMAGE_SIZE * _SUPERSAMPLE
    fx, fy, phase = rng.uniform(0.02, 0.25), rng.uniform(0.02, 0.25), rng.uniform(0, math.tau)
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    kind = rng.randrange(3)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    if kind == 0:  # oblique waves
        t = 0.5 + 0.5 * np.sin(fx * x + fy * y + phase)
    elif kind == 1:  # egg-crate
        t = 0.5 + 0.5 * np.sin(fx * x + phase) * np.sin(fy * y)
    else:  # checks
        t = ((np.floor(x * fx) + np.floor(y * fy)) % 2).astype(np.float32)
    pixels = c0 + (c1 - c0) * t[..., None]
    return _finish(Image.fromarray(pixels.astype(np.uint8)), rng)


def _finish(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    gain = rng.uniform(0.8, 1.2)  # lighting
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write_split(out: Path, name: str, classes: list[str], items: list[tuple[int, str, Callable[[], Image.Image]]]
                 ) -> dict:
    writer = ShardSplitWriter(out / name, SAMPLES_PER_SHARD, classes)
    for index, (cls, class_name, draw) in enumerate(items):
        writer.write(f"{name}-{index:06d}", _jpeg(draw()), "jpg", cls,
                     {"split": name, "class_name": class_name, "source": "disttrain-demo"})
    manifest = writer.close({"split": name})
    return {"num_samples": manifest["num_samples"], "num_shards": len(manifest["shards"])}


def generate(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write the demo dataset to `out_dir` (deterministic for a given seed); returns demo.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [species_name(*sp) for sp in SPECIES]
    id_names, holdout_names = names[:NUM_ID_CLASSES], names[NUM_ID_CLASSES:]

    def birds(split: str, species: list[tuple]) -> list:
        items = []
        for i in range(SPLIT_SIZES[split]):
            for c, sp in enumerate(species):
                rng = random.Random(f"{seed}/{split}/{c}/{i}")
                items.append((c, species_name(*sp), lambda rng=rng, sp=sp: _bird(rng, *sp)))
        random.Random(f"{seed}/{split}/order").shuffle(items)  # shards must not be sorted by class
        return items

    def pool(split: str, draw: Callable[[random.Random], Image.Image]) -> list:
        return [(-1, split, lambda i=i: draw(random.Random(f"{seed}/{split}/{i}"))) for i in range(POOL_SIZES[split])]

    splits = {
        "train": _write_split(out, "train", id_names, birds("train", SPECIES[:NUM_ID_CLASSES])),
        "test": _write_split(out, "test", id_names, birds("test", SPECIES[:NUM_ID_CLASSES])),
        "holdout": _write_split(out, "holdout", holdout_names, birds("holdout", SPECIES[NUM_ID_CLASSES:])),
        "outliers": _write_split(out, "outliers", [], pool("outliers", _outlier_scene)),
        "far_ood": _write_split(out, "far_ood", [], pool("far_ood", _texture)),
    }
    info = {"name": "disttrain-demo", "seed": seed, "image_size": IMAGE_SIZE, "id_classes": id_names,
            "holdout_classes": holdout_names, "splits": splits,
            "roles": {"train": "id-train", "test": "id-test", "holdout": "near-ood", "outliers": "oe-pool",
                      "far_ood": "far-ood"}}
    files.write_json(out / "demo.json", info)
    return info
