"""Cost of the frozen-feature evaluations against one feature-extraction pass: linear probe (L-BFGS with its
l2 sweep), SLIP's SGD probe, and kNN, on features of the synthetic classification task.

Usage: python benchmarks/eval_probe.py [--model vit_ti16 --image-size 224 | --checkpoint PATH]
           [--num-train 5000] [--num-test 1000] [--device cpu] [--out benchmarks/results]
Writes eval_probe.json and eval_probe.md (with the command line and the machine) under --out.
The model is randomly initialised unless --checkpoint is given; timings do not depend on its weights.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slip.data.synthetic import SyntheticClassification
from slip.eval.features import extract_features
from slip.eval.knn import knn_accuracy
from slip.eval.linear_probe import linear_probe, sgd_linear_probe
from slip.models import MODEL_BUILDERS, ImageTextModel


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn()'s result and its wall time in seconds (the device synchronised on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def build_model(args: argparse.Namespace) -> ImageTextModel:
    """The checkpoint's model, or a randomly initialised preset at the requested image size."""
    if args.checkpoint:
        from slip.pretrained import load_pretrained

        return load_pretrained(args.checkpoint)
    torch.manual_seed(0)
    return MODEL_BUILDERS[args.model](image_size=args.image_size, inputs=("image", "text"))


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> None:
    """Extract features once, time each probe on them, write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_ti16", choices=sorted(MODEL_BUILDERS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint to load instead of --model")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--source-size", type=int, default=64, help="side of the generated images, in pixels")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--sgd-epochs", type=int, default=90, help="0 skips the SGD probe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args).to(device)
    train = SyntheticClassification(num_samples=args.num_train, image_size=args.source_size, seed=1)
    test = SyntheticClassification(num_samples=args.num_test, image_size=args.source_size, seed=2)
    num_classes = len(train.classes)

    def extract(dataset: SyntheticClassification) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = extract_features(model, dataset, args.batch_size, args.num_workers)
        return features.to(device), labels.to(device)

    (train_x, train_y), train_seconds = timed(lambda: extract(train), device)
    (test_x, test_y), test_seconds = timed(lambda: extract(test), device)
    extraction = train_seconds + test_seconds
    probes: dict[str, dict[str, Any]] = {}
    result, seconds = timed(lambda: linear_probe(train_x, train_y, test_x, test_y, num_classes), device)
    probes["linear_probe (L-BFGS + l2 sweep)"] = {
        "seconds": seconds, "fits": len(result["sweep"]) + 1, "l2": result["l2"], "top1": result["top1"]}
    if args.sgd_epochs:
        result, seconds = timed(lambda: sgd_linear_probe(train_x, train_y, test_x, test_y, num_classes,
                                                         epochs=args.sgd_epochs), device)
        probes[f"sgd_linear_probe ({args.sgd_epochs} epochs)"] = {"seconds": seconds, "top1": result["top1"]}
    result, seconds = timed(lambda: knn_accuracy(train_x, train_y, test_x, test_y, num_classes), device)
    probes["knn (k=20)"] = {"seconds": seconds, "top1": result["top1"]}
    for record in probes.values():
        record["vs_extraction"] = record["seconds"] / extraction
    command = "python " + shlex.join(sys.argv)
    record = {
        "command": command,
        "machine": machine(device),
        "model": args.checkpoint or f"{args.model} @ {model.arch['image_size']} px (random init)",
        "feature_dim": train_x.shape[1],
        "num_train": args.num_train,
        "num_test": args.num_test,
        "extraction_seconds": extraction,
        "extraction_images_per_second": (args.num_train + args.num_test) / extraction,
        "probes": probes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_probe.json").write_text(json.dumps(record, indent=2) + "\n")
    info = record["machine"]
    lines = [
        f"Machine: {info['device']} ({info['processor']}, {info['threads']} threads), torch {info['torch']}.",
        f"Command: `{command}`",
        "",
        f"Model {record['model']}, {record['feature_dim']}-d backbone features; {args.num_train} train and "
        f"{args.num_test} test images of the synthetic task ({num_classes} classes).",
        f"Feature extraction (train + test, once): {extraction:.2f} s "
        f"({record['extraction_images_per_second']:.0f} images/s).",
        "",
        "| evaluation on cached features | seconds | x extraction | top-1 (%) |",
        "|---|---|---|---|",
        *(f"| {name} | {r['seconds']:.2f} | {r['vs_extraction']:.3f} | {r['top1']:.1f} |"
          for name, r in probes.items()),
    ]
    (args.out / "eval_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
