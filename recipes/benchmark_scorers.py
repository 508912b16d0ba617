"""Benchmark: our OOD scorers against pytorch-ood 0.4 on the same synthetic tensors.

Each (library, scorer) runs in a fresh subprocess that builds the same seeded data (ID fit set
with labels; score set, half ID and half shifted "OOD"; D-d non-negative penultimate features,
logits = features @ W^T + b from a fixed random head), then fits and scores `--repeats` times.
Time: median of the repeats, fit and score separately. Memory: the peak RSS (ru_maxrss, its
high-water mark reset after the data is built) and its increment over the RSS with the data.
Ours fits streaming (`--batch-size` rows per fit_batch); pytorch-ood fits on the whole tensors
(its fit_logits / fit_features / fit_feature_maps); both score the whole score tensor in one
call, as recipes/evaluate.py does. Agreement: Spearman correlation of the two libraries' scores
(both are higher = more OOD; ranks, so a rank-equivalent stored statistic such as our MSP's
log(1 - max softmax) compares as is) and Pearson correlation of the paper's scores (ours mapped
back by `Scorer.paper_score`: MSP/ODIN -max softmax, as pytorch-ood's MaxSoftmax returns).
Not a test: a measurement to quote.

    .venv/bin/pip install --no-deps pytorch-ood==0.4.0   # the baseline (torch/numpy/scipy already there)
    python recipes/benchmark_scorers.py                      # 200 000 x 2048, all scorers (Gram: skipped)
    python recipes/benchmark_scorers.py --scorers mahalanobis,vim --num-samples 50000 \
        --out runs/benchmark_scorers/results_50k_fitted.json  # the D^2-per-sample scorers at a smaller N
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor

from disttrain.ood import scorers as ours_lib
from disttrain.ood.scorers import Features, vim_default_dim

SKIPPED = {"gram": "pytorch-ood's Gram has no tensor-level fit (fit(loader) runs its feature_layers on inputs) "
                   "and predict_structured takes raw block maps, not precomputed Gram features; the inputs "
                   "are N x C x H x W block maps, not part of this N x D benchmark",
           "ood_class": "CMG-softmax's extra OOD output: pytorch-ood has no counterpart"}
NOTES = {"odin": "pytorch-ood's ODIN needs a model and an input gradient even at eps=0; with eps=0 it is "
                 "MaxSoftmax(t=1000).predict_logits, which is what is timed; ours stores log(1 - max softmax) "
                 "(rank-equivalent; pearson on -max softmax)",
         "mahalanobis": "pytorch-ood: 0.5 * distance with precision inv(scatter + 1e-6 I), scatter not / N: "
                        "ours / (2N), same ranking",
         "entropy": "pytorch-ood clips p at 1e-7 before the log",
         "msp": "ours stores log(1 - max softmax) in float64 (rank-equivalent; pearson on -max softmax), "
                "pytorch-ood -max softmax in float32, which ties saturated inputs",
         "react": "ours: percentile from a 1M-value reservoir sample; pytorch-ood: exact np.percentile"}


def import_pytorch_ood():
    try:
        from pytorch_ood import detector
    except ImportError:
        sys.exit("pytorch-ood is not installed; install the baseline without touching torch:\n"
                 "    .venv/bin/pip install --no-deps pytorch-ood==0.4.0")
    return detector


ROOT = Path(__file__).resolve().parents[1]
SCORERS_SHA = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(ours_lib.__file__).parent.glob("*.py")))
                             ).hexdigest()[:12]  # the code measured


# ----------------------------------------------------------------------------- data

def head(dim: int, classes: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    mix = torch.randn(64, dim, generator=g) * (2.0 / 8)  # rank-64 correlated part
    weight = means * (0.2 / dim ** 0.5)  # full rank: ViM's origin -pinv(W) b stays moderate
    return means, mix, weight, torch.randn(classes, generator=g) * 0.1


def make_data(n: int, args, seed: int, ood: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Features [n, D] = relu(class mean + low-rank + anisotropic noise), logits [n, C], labels [n]; built in
    1024-row chunks so that building leaves no transient peak. With ood, every 2nd sample's mean
    is the midpoint of two random class means."""
    means, mix, weight, bias = head(args.dim, args.classes, args.seed)
    g = torch.Generator().manual_seed(seed)
    features, logits = torch.empty(n, args.dim), torch.empty(n, args.classes)
    labels = (torch.arange(n) % args.classes)[torch.randperm(n, generator=g)]
    noise = (1 + torch.arange(args.dim) / 8) ** -0.5  # decaying spectrum: ViM's subspace is well defined
    for i in range(0, n, 1024):
        y = labels[i:i + 1024]
        mu = means[y]
        if ood:
            k = len(y[1::2])
            pair = torch.randint(args.classes, (2, k), generator=g)
            mu[1::2] = 0.5 * (means[pair[0]] + means[pair[1]])
        h = mu + torch.randn(len(y), 64, generator=g) @ mix + torch.randn(len(y), args.dim, generator=g) * noise
        features[i:i + len(y)] = h.clamp_(min=0)
        torch.addmm(bias, features[i:i + len(y)], weight.T, out=logits[i:i + len(y)])
    return features, logits, labels


# ----------------------------------------------------------------------------- the two libraries

def run_ours(name: str, fit, test, args, products: str | None = None) -> tuple[Tensor, float, float]:
    hyper = {"odin": {"temperature": 1000.0, "epsilon": 0.0}, "energy": {"temperature": 1.0},
             "react": {"percentile": 90.0}}.get(name, {})
    if products and "products" in ours_lib.SCORERS[name].hyperparameters():
        hyper = {**hyper, "products": products}
    _, _, weight, bias = head(args.dim, args.classes, args.seed)
    t0 = time.perf_counter()  # as for theirs, building the scorer (ViM: pinv(W)) counts as fitting
    scorer = ours_lib.get(name, **hyper)
    if scorer.needs_classifier:
        scorer.set_classifier(weight, bias)
    if scorer.needs_fit:
        x, logits, labels = fit
        for _ in range(scorer.fit_passes):
            for i in range(0, len(x), args.batch_size):
                s = slice(i, i + args.batch_size)
                scorer.fit_batch(Features(logits[s], x[s], labels=labels[s]))
            scorer.fit_end()
    t1 = time.perf_counter()
    scores = scorer.score(Features(test[1], test[0]))
    return scores, t1 - t0, time.perf_counter() - t1


THEIR_LOGIT_DETECTORS = {"msp": ("MaxSoftmax", {}), "odin": ("MaxSoftmax", {"t": 1000.0}),
                         "energy": ("EnergyBased", {"t": 1.0}), "maxlogit": ("MaxLogit", {}),
                         "entropy": ("Entropy", {}), "kl_matching": ("KLMatching", {})}


def run_theirs(name: str, fit, test, args) -> tuple[Tensor, float, float]:
    det = import_pytorch_ood()
    _, _, weight, bias = head(args.dim, args.classes, args.seed)
    t0 = time.perf_counter()
    if name in THEIR_LOGIT_DETECTORS:
        cls, hyper = THEIR_LOGIT_DETECTORS[name]
        d = getattr(det, cls)(None, **hyper)
        if d.requires_fit:
            d.fit_logits(fit[1], fit[2])
        predict, inputs = d.predict_logits, test[1]
    elif name == "mahalanobis":
        d = det.Mahalanobis(None).fit_features(fit[0], fit[2])
        predict, inputs = d.predict_features, test[0]
    elif name == "vim":
        d = det.ViM(None, d=vim_default_dim(args.dim), w=weight, b=bias).fit_features(fit[0], fit[2])
        predict, inputs = d.predict_features, test[0]
    elif name == "react":
        linear = torch.nn.Linear(args.dim, args.classes)
        linear.weight.data, linear.bias.data = weight.clone(), bias.clone()
        d = det.ReAct(backbone=None, head=linear, percentile=0.9).fit_feature_maps(fit[0], fit[2])
        predict, inputs = d.predict_feature_maps, test[0]
    else:
        raise ValueError(f"no pytorch-ood counterpart for {name!r}")
    t1 = time.perf_counter()
    scores = predict(inputs)
    return scores, t1 - t0, time.perf_counter() - t1


# ----------------------------------------------------------------------------- one measurement

def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(args) -> None:
    lib, name = args.child
    torch.set_num_threads(args.threads)
    import_pytorch_ood()  # both children import both libraries: same baseline
    needs_fit = ours_lib.SCORERS[name].needs_fit
    fit = make_data(args.num_fit_samples, args, args.seed + 1, ood=False) if needs_fit else None
    test = make_data(args.num_samples, args, args.seed + 2, ood=True)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # freed heap pages of the data build are not a baseline to reuse
    base = rss_mib()
    try:  # reset the peak-RSS high-water mark, so that ru_maxrss is the peak from here on
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    fit_s, score_s = [], []
    started = time.perf_counter()
    with torch.no_grad():  # at least --repeats, more for fast scorers: until --min-seconds have passed
        while len(fit_s) < args.repeats or (time.perf_counter() - started < args.min_seconds and len(fit_s) < 1000):
            scores, f, s = (run_ours if lib == "ours" else run_theirs)(name, fit, test, args)
            fit_s.append(f)
            score_s.append(s)
            scores = scores.double().numpy().copy()
            gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(args.scores_file, scores)
    agreement = {}
    if lib == "ours" and args.reference:  # the all-float64 reference: the same scorer on float64 features
        with torch.no_grad():
            as64 = lambda data: None if data is None else tuple(t.double() if t.is_floating_point() else t  # noqa: E731
                                                               for t in data)
            reference = run_ours(name, as64(fit), as64(test), args, products="float64")[0].double().numpy()
        # relative to each score, or to the median score magnitude for scores near 0 (ViM's cross it)
        error = np.abs(scores - reference) / np.maximum(np.abs(reference), np.median(np.abs(reference)))
        agreement = {"max_rel_error_vs_float64": float(error.max()),
                     "median_rel_error_vs_float64": float(np.median(error)),
                     "max_rank_shift_vs_float64": int(np.abs(rankdata(scores, method="ordinal")
                                                              - rankdata(reference, method="ordinal")).max())}
    print(json.dumps({"fit_s": statistics.median(fit_s), "score_s": statistics.median(score_s),
                      "fit_all_s": fit_s, "score_all_s": score_s, "peak_mib": peak,
                      "data_rss_mib": base, "incr_mib": peak - base, "peak_reset": reset, "scorers_sha": SCORERS_SHA,
                      **agreement}))


def measure(lib: str, name: str, args, tmp: str) -> tuple[dict, np.ndarray]:
    path = os.path.join(tmp, f"{lib}-{name}.npy")
    cmd = [sys.executable, __file__, "--child", lib, name, "--scores-file", path] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
        ("num_samples", "num_fit_samples", "dim", "classes", "batch_size", "repeats", "min_seconds", "reference",
         "threads", "seed")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"{lib} {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(path)


def agreement(ours: dict) -> str:
    if "max_rel_error_vs_float64" not in ours:
        return "-"
    return f"{ours['max_rel_error_vs_float64']:.1e}, {ours['max_rank_shift_vs_float64']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=200_000, help="score-set size")
    p.add_argument("--num-fit-samples", type=int, default=None, help="fit-set size (default: --num-samples)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--scorers", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per fit_batch of our streaming fit")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, at least")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="repeat fast scorers until this much time has passed (medians of many ms-long runs)")
    p.add_argument("--reference", type=int, default=1,
                   help="1: also score ours on float64 features (untimed) and report the agreement with it")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/benchmark_scorers/results.json")
    p.add_argument("--child", nargs=2, metavar=("LIB", "SCORER"), help=argparse.SUPPRESS)
    p.add_argument("--scores-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.num_fit_samples = args.num_fit_samples or args.num_samples
    if args.child:
        return child(args)
    import_pytorch_ood()
    names = ours_lib.names() if args.scorers == "all" else args.scorers.split(",")
    unknown = [n for n in names if n not in ours_lib.SCORERS]
    if unknown:
        sys.exit(f"unknown scorer(s) {unknown}; registered: {', '.join(ours_lib.names())}")
    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in SKIPPED:
                rows.append({"scorer": name, "skipped": SKIPPED[name]})
                print(f"{name}: skipped ({SKIPPED[name]})", flush=True)
                continue
            (a, sa), (b, sb) = measure("ours", name, args, tmp), measure("theirs", name, args, tmp)
            row = {"scorer": name, "ours": a, "theirs": b,
                   "time_ratio": (b["fit_s"] + b["score_s"]) / (a["fit_s"] + a["score_s"]),
                   "memory_ratio": max(b["incr_mib"], 1.0) / max(a["incr_mib"], 1.0),
                   "spearman": float(spearmanr(sa, sb).statistic),
                   "pearson": float(np.corrcoef(ours_lib.SCORERS[name].paper_score(sa), sb)[0, 1]),
                   "note": NOTES.get(name, "")}
            rows.append(row)
            print(f"{name}: time ratio {row['time_ratio']:.2f}, memory ratio {row['memory_ratio']:.2f}, "
                  f"spearman {row['spearman']:.6f}", flush=True)
    load.append(os.getloadavg()[0])
    shas = sorted({r[k]["scorers_sha"] for r in rows if "ours" in r for k in ("ours", "theirs")} | {SCORERS_SHA})
    if len(shas) > 1:
        print(f"WARNING: disttrain/ood/scorers/ changed during the run (sha256 {shas}): rerun", file=sys.stderr)
    header = ("scorer", "ours fit s", "theirs fit s", "ours score s", "theirs score s", "time ratio",
              "ours peak MiB (+incr)", "theirs peak MiB (+incr)", "mem ratio", "spearman", "pearson",
              "ours vs all-float64: max rel err, max rank shift")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['scorer']} | skipped: see JSON" + " |" * (len(header) - 1))
            continue
        a, b = r["ours"], r["theirs"]
        lines.append(f"| {r['scorer']} | {a['fit_s']:.3f} | {b['fit_s']:.3f} | {a['score_s']:.3f} | "
                     f"{b['score_s']:.3f} | {r['time_ratio']:.2f} | {a['peak_mib']:.0f} (+{a['incr_mib']:.0f}) | "
                     f"{b['peak_mib']:.0f} (+{b['incr_mib']:.0f}) | {r['memory_ratio']:.2f} | "
                     f"{r['spearman']:.6f} | {r['pearson']:.6f} | {agreement(a)} |")
    print(f"\n{args.num_samples} scored / {args.num_fit_samples} fit samples x {args.dim}-d, {args.classes} "
          f"classes, {args.threads} threads, median of {args.repeats}; ratios theirs/ours (>1: ours faster / "
          f"smaller; memory on the increments)\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    config = {k: v for k, v in vars(args).items() if k not in ("child", "scores_file")}
    versions = {"torch": torch.__version__, "pytorch_ood": importlib.metadata.version("pytorch-ood"),
                "scorers_sha256": shas}
    tmp_out.write_text(json.dumps({"config": config, "versions": versions, "loadavg_1min": load,
                                   "rows": rows, "table": lines}, indent=2))
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
