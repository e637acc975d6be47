"""Our CLIP train step against open_clip's for the identical architecture, and our CLIP view against its transform.

Usage: python benchmarks/peers.py [--model vit_s16] [--batch 32] [--pairs 5] [--samples 400] [--out benchmarks/results]
Needs open_clip_torch (`pip install -e ".[interop]"`). One process per comparison (`suite.isolated`):
- train step: our model in OpenAI layout (so that open_clip's own ViT is the same network: the same widths, depth,
  heads, image size, context length, QuickGELU, pre-norm) is exported to open_clip (`slip.interop.open_clip`) and
  loaded there, so both start from the same weights; each takes one untimed warm-up step, then they alternate
  `--pairs` timed steps each (fwd + bwd + fused AdamW, fp32 on CPU, bf16 autocast on GPU), CLIP objective
  (ours: `slip.losses.CLIPLoss`; theirs: `open_clip.ClipLoss`). Three settings: real-length captions (our text
  tower trims the padding), full 77-token captions, and patch dropout 0.5 on ours against open_clip with and
  without its own patch dropout 0.5.
- CLIP view: JPEG -> decoded RGB -> the training view at 224 px, one core: ours (`clip_view` pipeline of the
  tensor backend, MultiView with image + text) against `open_clip.image_transform(224, is_train=True)` on PIL.
Writes peers.json and peers.md under --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from captions import REAL_CAPTIONS
from suite import (_synchronize, _train_batch, error_row, isolated, machine_record, photo_jpeg, results_header,
                   timed_in_rounds, training_task, write_results)


def train_steps(device_name: str, model_name: str, batch_size: int, pairs: int, full_captions: bool,
                patch_dropout: float, theirs_patch_dropout: float) -> dict[str, Any]:
    """Median and range of our and open_clip's CLIP train steps on the same network and weights, alternating."""
    import open_clip
    import torch

    from slip.interop.open_clip import export_open_clip

    device = torch.device(device_name)
    task, optimizer = training_task(device, model_name, "clip", openai_layout=True, patch_dropout=patch_dropout)
    with tempfile.TemporaryDirectory() as directory:
        export_open_clip(task.model, Path(directory) / "open_clip")
        theirs = open_clip.create_model("local-dir:" + str(Path(directory) / "open_clip"),
                                        force_patch_dropout=theirs_patch_dropout or None).to(device).train()
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    their_loss = open_clip.ClipLoss()
    arch = task.model.arch
    batch = _train_batch(("image", "text"), batch_size, arch["image_size"], arch["context_length"], device)
    if full_captions:  # every caption as long as the context allows
        long_caption = " ".join(REAL_CAPTIONS)
        from slip.tokenizer import tokenize
        batch["text"] = tokenize([long_caption] * batch_size, arch["context_length"]).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def ours() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task(batch)["loss"]
        loss.backward()
        optimizer.step()

    def open_clip_step() -> None:
        their_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            image, text, scale = theirs(batch["image"], batch["text"])
            loss = their_loss(image, text, scale)
        loss.backward()
        their_optimizer.step()

    def timed(step) -> float:
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        return time.perf_counter() - start

    ours(), open_clip_step()  # warm-up, untimed
    times: dict[str, list[float]] = {"ours": [], "open_clip": []}
    for _ in range(pairs):
        times["ours"].append(timed(ours))
        times["open_clip"].append(timed(open_clip_step))
    ratios = [b / a for a, b in zip(times["ours"], times["open_clip"])]
    tokens = int((batch["text"] != 0).sum(dim=1).float().mean())
    return {"model": model_name, "batch_size": batch_size, "pairs": pairs, "full_captions": full_captions,
            "mean_caption_tokens": tokens, "patch_dropout": patch_dropout, "open_clip_patch_dropout":
            theirs_patch_dropout, "ours_step_s": statistics.median(times["ours"]),
            "open_clip_step_s": statistics.median(times["open_clip"]), "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)], "times": times, "open_clip": open_clip.__version__}


def clip_view_rates(samples: int, rounds: int = 10) -> dict[str, Any]:
    """Samples/s on one core: JPEG -> decoded -> the 224 px training view, ours against open_clip's transform."""
    import open_clip
    import torch

    from slip.data.decode import decode_image
    from slip.data.transforms import build_multiview
    from slip.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.set_num_threads(1)
    jpegs = [photo_jpeg(seed=seed) for seed in range(8)]
    ours = build_multiview(("image",), 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, backend="tensor")
    theirs = open_clip.image_transform(224, is_train=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    runs = {"ours": lambda jpeg: ours(decode_image(jpeg, "bench"), "")["image"],
            "open_clip": lambda jpeg: theirs(decode_image(jpeg, "bench"))}
    seconds, count = timed_in_rounds(runs, jpegs, samples, rounds)
    return {"samples": count, "source": "640x430 JPEG q90",
            **{f"{name}_samples_per_s_per_core": count / seconds[name] for name in runs},
            "speedup": seconds["open_clip"] / seconds["ours"],
            "open_clip_transform": repr(theirs).replace("\n", " ")}


def markdown(payload: dict[str, Any]) -> str:
    """The comparison tables."""
    lines = [*results_header("slip against open_clip, same run", payload["command"], payload["machine"]),
             "## CLIP train step (fwd + bwd + fused AdamW), identical network and weights, alternating pairs", "",
             "| captions | mean tokens | slip patch dropout | open_clip patch dropout | slip s/step | open_clip s/step "
             "| speed-up (median of pairs) | range |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in payload["train"]:
        if "error" in row:
            lines.append(error_row([], row["error"], 8))
            continue
        lines.append(f"| {'full-context' if row['full_captions'] else 'real-length'} | {row['mean_caption_tokens']} "
                     f"| {row['patch_dropout']} | {row['open_clip_patch_dropout']} | {row['ours_step_s']:.2f} | "
                     f"{row['open_clip_step_s']:.2f} | **{row['speedup']:.2f}x** | "
                     f"{row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f} |")
    view = payload["clip_view"]
    if "error" in view:
        lines += ["", f"CLIP view: error: {view['error']}"]
    else:
        lines += ["", "## CLIP training view, one core (JPEG decode included)", "",
                  "| slip samples/s | open_clip samples/s | speed-up |", "|---:|---:|---:|",
                  f"| {view['ours_samples_per_s_per_core']:.1f} | {view['open_clip_samples_per_s_per_core']:.1f} | "
                  f"**{view['speedup']:.2f}x** |", "", f"open_clip's transform: `{view['open_clip_transform']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, write peers.json and peers.md."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = [(False, 0.0, 0.0), (True, 0.0, 0.0), (False, 0.5, 0.0), (False, 0.5, 0.5)]
    train = []
    for full, ours_rate, their_rate in settings:
        train.append(isolated(train_steps, args.device, args.model, args.batch, args.pairs, full, ours_rate,
                              their_rate))
        print(json.dumps({k: v for k, v in train[-1].items() if k != "times"}), file=sys.stderr, flush=True)
    view = isolated(clip_view_rates, args.samples)
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "machine": machine_record(args.device), "train": train, "clip_view": view}
    text = markdown(payload)
    write_results(args.out, "peers", payload, text)
    print(text)


if __name__ == "__main__":
    main()
