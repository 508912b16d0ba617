"""Benchmark: evaluate's feature pass against a bare `torch.inference_mode()` loop over the same model.

The feature pass is what recipes/evaluate.py runs per evaluation set: the classifier detector's
`forward` per batch (logits, penultimate features, and block features for the scorers that need
them), then the set's outputs concatenated and put in sample order. The bare loop is
`with torch.inference_mode(): model(images)` over the same in-memory batches (so the data loader
is not measured), with the same memory format and compute precision. The two alternate
`--repeats` times; reported: the median images/s of each and the median ratio of each feature
pass to the bare passes on either side of it (target >= 0.95). Not a test: a measurement to quote.

    python recipes/benchmark_features.py                              # resnet18, 64 px, batch 64, CPU
    python recipes/benchmark_features.py --scorers mahalanobis,gram   # with block features too
    python recipes/benchmark_features.py --device cuda --precision bf16 --channels-last --image-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from disttrain.config.sections import ModelConfig
from disttrain.models.cards import classifier_card
from disttrain.models.classifier import build_classifier
from disttrain.ood import detectors
from disttrain.ood.detectors import concat_outputs, take_outputs

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def saved_detector(args, run_dir: Path) -> detectors.Detector:
    """A random-init classifier saved as a stage saves it, loaded back as evaluate loads it."""
    from safetensors.torch import save_file

    model_args = ModelConfig(name=args.model).arguments()
    model = build_classifier(num_outputs=args.classes, image_size=args.image_size, **model_args)
    (run_dir / "model").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / "model" / "model.safetensors")
    card = classifier_card(model_args, args.classes, [str(c) for c in range(args.classes)], args.image_size,
                           args.image_size)
    return detectors.build(card, str(run_dir), scorers=args.scorers.split(","), scorer_args=[],
                           channels_last=args.channels_last)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=16, help="batches per pass")
    p.add_argument("--repeats", type=int, default=7, help="feature passes (bare passes: one more)")
    p.add_argument("--scorers", default="msp,energy,mahalanobis,vim",
                   help="what evaluate scores with (decides the features collected)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="runs/benchmark_features/results.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = PRECISIONS[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    with tempfile.TemporaryDirectory() as tmp:
        detector = saved_detector(args, Path(tmp))
    detector.keep_outputs_on_device = True  # as in a one-process evaluate
    detector.setup(device)
    model = detector.model  # the same weights, in the same memory format
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
                .contiguous(memory_format=memory_format),
                torch.randint(args.classes, (args.batch_size,), device=device)) for _ in range(args.batches)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), autocast():
            for images, _ in batches:
                model(images)
        sync()
        return len(batches) * args.batch_size / (time.perf_counter() - start)

    def features() -> float:  # evaluate's outputs_of + the set's concat and sample order
        sync()
        start = time.perf_counter()
        parts = []
        for i, (images, labels) in enumerate(batches):
            index = torch.arange(i * args.batch_size, (i + 1) * args.batch_size)
            parts.append({"outputs": detector.forward(images, labels, perturb=True, autocast=autocast),
                          "index": index})
        order = torch.cat([part["index"] for part in parts]).argsort()
        take_outputs(concat_outputs([part["outputs"] for part in parts]), order)
        sync()
        return len(batches) * args.batch_size / (time.perf_counter() - start)

    bare(), features()  # warm-up
    bare_rates, feature_rates = [bare()], []
    for _ in range(args.repeats):
        feature_rates.append(features())
        bare_rates.append(bare())
    ratios = [f / statistics.mean(bare_rates[i:i + 2]) for i, f in enumerate(feature_rates)]
    result = {"config": vars(args), "torch": torch.__version__, "bare_images_per_s": statistics.median(bare_rates),
              "feature_pass_images_per_s": statistics.median(feature_rates), "ratio": statistics.median(ratios),
              "ratios": ratios}
    print(f"{args.model} {args.image_size}px batch {args.batch_size} on {device} ({args.precision}"
          f"{', channels_last' if args.channels_last else ''}, {args.threads} threads), scorers {args.scorers}:\n"
          f"  bare inference_mode loop {result['bare_images_per_s']:.1f} images/s, evaluate's feature pass "
          f"{result['feature_pass_images_per_s']:.1f} images/s, ratio {result['ratio']:.3f} (target >= 0.95)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
