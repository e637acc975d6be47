"""Patch dropout (FLIP): train-step img/s and model FLOPs per step at several dropout rates, per objective.

Usage: python benchmarks/patch_dropout.py [--model vit_s16] [--losses clip,slip] [--rates 0,0.5,0.75]
           [--batch 16] [--repeats 3] [--out benchmarks/results]
Each (objective, rate) runs in a fresh process (`suite.isolated`): the seeded model with `patch_dropout=rate` (the
SSL views too), fused AdamW, a batch of random images and real-length captions, one counted warm-up step, then
`--repeats` timed steps (median, with the dense-matmul rate measured around each, as suite.py does). Writes
patch_dropout.json and patch_dropout.md under --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from suite import OBJECTIVES, error_row, isolated, machine_record, results_header, train_step, write_results


def measure(device: str, model: str, losses: list[str], rates: list[float], batch: int, repeats: int) -> list[dict]:
    """One train-step measurement per (objective, rate)."""
    rows = []
    for loss in losses:
        for rate in rates:
            row = isolated(train_step, device, model, loss, batch, repeats, 1024, 0.5, False, {"patch_dropout": rate})
            rows.append({"objective": loss, "patch_dropout": rate, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The measurements, and each rate's speed-up and FLOPs against rate 0 of the same objective."""
    lines = [*results_header(f"Patch dropout: {payload['model']}, batch {payload['batch']}", payload["command"],
                             payload["machine"]),
             "| objective | patch dropout | step s | img/s | speed-up | model GFLOP/step | FLOPs vs 0 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = {row["objective"]: row for row in payload["rows"] if row.get("patch_dropout") == 0 and "error" not in row}
    for row in payload["rows"]:
        if "error" in row:
            lines.append(error_row([row["objective"], row["patch_dropout"]], row["error"], 7))
            continue
        reference = base.get(row["objective"])
        speedup = f"{row['images_per_s'] / reference['images_per_s']:.2f}x" if reference else "–"
        flops = f"{row['model_tflops_per_step'] / reference['model_tflops_per_step']:.2f}" if reference else "–"
        lines.append(f"| {row['objective']} | {row['patch_dropout']} | {row['step_s']:.2f} | "
                     f"{row['images_per_s']:.2f} | {speedup} | {1000 * row['model_tflops_per_step']:.1f} | {flops} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, write the results."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--losses", default="clip,slip")
    parser.add_argument("--rates", default="0,0.5,0.75")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    losses = [loss for loss in args.losses.split(",") if loss]
    unknown = sorted(set(losses) - set(OBJECTIVES))
    if unknown:
        parser.error(f"--losses: unknown {unknown}; choose from {sorted(OBJECTIVES)}")
    rates = [float(rate) for rate in args.rates.split(",") if rate]
    rows = measure(args.device, args.model, losses, rates, args.batch, args.repeats)
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "machine": machine_record(args.device), "model": args.model, "batch": args.batch,
               "rows": rows}
    text = markdown(payload)
    write_results(args.out, "patch_dropout", payload, text)
    print(text)


if __name__ == "__main__":
    main()
