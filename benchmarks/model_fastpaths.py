"""Speed of the model's fast paths against the plain paths: text trimming, one batched pass for all views, the
channels-last ResNet tower, and SDPA attention.

Usage: python benchmarks/model_fastpaths.py [--out benchmarks/results] [--repeats 5]
Writes model_fastpaths.json and model_fastpaths.md with the machine described.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import sdpa_flop_count

from slip.host_memory import retain_freed_memory
from slip.models import vit_s16
from slip.models.vision import ModifiedResNet
from slip.tokenizer import tokenize

from captions import REAL_CAPTIONS  # benchmarks/captions.py, beside this script
from suite import machine_record  # benchmarks/suite.py


def time_call(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_text_trimming(batch: int, repeats: int) -> dict:
    """Text tower forward+backward on real-length captions, trimmed vs full 77-token context."""
    torch.manual_seed(0)
    model = vit_s16(inputs=("image", "text"))
    captions = [REAL_CAPTIONS[i % len(REAL_CAPTIONS)] for i in range(batch)]
    tokens = tokenize(captions)
    trimmed_length = int(tokens.argmax(dim=-1).max()) + 1

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.encode_text(tokens).sum().backward()

    results = {}
    for trim in (False, True):
        model.text.trim = trim
        results["trimmed" if trim else "full"] = time_call(step, repeats)
    return {
        "task": "text tower fwd+bwd (512 wide, 12 layers)",
        "batch": batch,
        "tokens_per_row_full": tokens.shape[1],
        "tokens_per_row_trimmed": trimmed_length,
        "seconds_full": results["full"],
        "seconds_trimmed": results["trimmed"],
        "speedup": results["full"] / results["trimmed"],
    }


def bench_batched_views(batch: int, image_size: int, repeats: int) -> dict:
    """ViT-S/16 image tower + heads fwd+bwd on the CLIP view and two SSL views: one pass vs three."""
    torch.manual_seed(0)
    model = vit_s16(image_size=image_size, inputs=("image", "aug1", "aug2"), text_layers=1)
    model.train()
    views = {k: torch.randn(batch, 3, image_size, image_size) for k in ("image", "aug1", "aug2")}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(views)
        sum(out[k].sum() for k in ("image_embed", "aug1_embed", "aug2_embed")).backward()

    results = {}
    for batched in (False, True):
        model.batch_views = batched
        results["batched" if batched else "separate"] = time_call(step, repeats)
    return {
        "task": f"ViT-S/16 {image_size}px 3 views fwd+bwd",
        "batch_per_view": batch,
        "seconds_separate": results["separate"],
        "seconds_batched": results["batched"],
        "speedup": results["separate"] / results["batched"],
    }


def alternating_pairs(steps: dict[str, Callable[[], None]], pairs: int) -> dict[str, list[float]]:
    """Wall times of each step, run in turns `pairs` times after one warm-up each, so that the machine's drift
    hits all alike."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(pairs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as three plain operators: what SDPA computes, without its fused kernel."""
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def bench_attention(images: int, pairs: int) -> dict:
    """ViT-S/16 attention fwd+bwd (6 heads of 64 over 197 tokens): SDPA, as the towers use it (flash attention on
    CPU), against the same attention written as matmul, softmax, matmul; alternating pairs."""
    torch.manual_seed(0)
    heads, tokens, width = 6, 197, 64
    q, k, v = (torch.randn(images, heads, tokens, width, requires_grad=True) for _ in range(3))
    grad = torch.randn(images, heads, tokens, width)

    def sdpa() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

    def written_out() -> None:
        written_out_attention(q, k, v).backward(grad)

    times = alternating_pairs({"sdpa": sdpa, "written_out": written_out}, pairs)
    ratios = [plain / fast for plain, fast in zip(times["written_out"], times["sdpa"])]
    flops = 3 * sdpa_flop_count(q.shape, k.shape, v.shape)  # forward once, backward twice, as the suite counts
    seconds_sdpa = statistics.median(times["sdpa"])
    return {
        "task": f"ViT-S/16 attention fwd+bwd, {images} images x {heads} heads x {tokens} tokens",
        "images": images,
        "seconds_written_out": statistics.median(times["written_out"]),
        "seconds_sdpa": seconds_sdpa,
        "sdpa_gflops": flops / seconds_sdpa / 1e9,
        "speedup": statistics.median(ratios),
        "pairs_faster": sum(ratio > 1 for ratio in ratios),
        "pairs": len(ratios),
    }


def bench_channels_last(batch: int, repeats: int) -> dict:
    """CLIP's RN50 image tower fwd+bwd, NCHW against NHWC (the same weights), in alternating pairs."""
    torch.manual_seed(0)
    towers = {layout: ModifiedResNet((3, 4, 6, 3), 1024, 32, 224, 64, channels_last=layout == "channels_last")
              for layout in ("contiguous", "channels_last")}
    towers["channels_last"].load_state_dict(towers["contiguous"].state_dict())
    images = torch.randn(batch, 3, 224, 224)

    def step(tower: ModifiedResNet) -> None:
        tower.zero_grad(set_to_none=True)
        tower(images).sum().backward()

    times = alternating_pairs({layout: lambda tower=tower: step(tower) for layout, tower in towers.items()}, repeats)
    ratios = [plain / fast for plain, fast in zip(times["contiguous"], times["channels_last"])]
    return {
        "task": "RN50 image tower 224px fwd+bwd",
        "batch": batch,
        "seconds_contiguous": statistics.median(times["contiguous"]),
        "seconds_channels_last": statistics.median(times["channels_last"]),
        "speedup": statistics.median(ratios),
        "pairs_faster": sum(ratio > 1 for ratio in ratios),
        "pairs": len(ratios),
    }


def main() -> None:
    """Run the benchmarks and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-batch", type=int, default=128)
    parser.add_argument("--view-batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--resnet-pairs", type=int, default=8)
    parser.add_argument("--attention-images", type=int, default=24, help="3 views of batch 8, as a SLIP step")
    parser.add_argument("--attention-pairs", type=int, default=15)
    args = parser.parse_args()
    retain_freed_memory()  # as slip.train does by default
    machine = machine_record()
    text = bench_text_trimming(args.text_batch, args.repeats)
    views = bench_batched_views(args.view_batch, args.image_size, args.repeats)
    layout = bench_channels_last(args.resnet_batch, args.resnet_pairs)
    attention = bench_attention(args.attention_images, args.attention_pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "text_trimming": text, "batched_views": views, "channels_last": layout,
              "attention": attention}
    (args.out / "model_fastpaths.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "| fast path | setting | plain (s) | fast (s) | speedup |",
        "|---|---|---|---|---|",
        f"| text trimming | batch {text['batch']}, {text['tokens_per_row_full']} -> "
        f"{text['tokens_per_row_trimmed']} tokens | {text['seconds_full']:.3f} | {text['seconds_trimmed']:.3f} | "
        f"{text['speedup']:.2f}x |",
        f"| batched views | {views['task']}, batch {views['batch_per_view']}/view | {views['seconds_separate']:.3f} | "
        f"{views['seconds_batched']:.3f} | {views['speedup']:.2f}x |",
        f"| channels-last ResNet | {layout['task']}, batch {layout['batch']}, {layout['pairs']} alternating pairs "
        f"(faster in {layout['pairs_faster']}) | {layout['seconds_contiguous']:.3f} | "
        f"{layout['seconds_channels_last']:.3f} | {layout['speedup']:.2f}x (median pair) |",
        f"| SDPA attention | {attention['task']}, {attention['pairs']} alternating pairs (faster in "
        f"{attention['pairs_faster']}; SDPA at {attention['sdpa_gflops']:.0f} GFLOP/s) | "
        f"{attention['seconds_written_out']:.3f} | {attention['seconds_sdpa']:.3f} | {attention['speedup']:.2f}x "
        "(median pair) |",
    ]
    command = " ".join(["python benchmarks/model_fastpaths.py", *sys.argv[1:]])
    header = (f"Machine: {machine['processor']} ({machine.get('cpu_model', 'unknown CPU')}), {machine['threads']} "
              f"threads, torch {machine['torch']}, CPU fp32, "
              "freed host memory retained.\n"
              f"Command: `{command}` (medians of the repeats after a warm-up)\n\n")
    (args.out / "model_fastpaths.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
