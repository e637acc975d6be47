"""Where one training step's time goes, operator by operator: matmuls, attention, and everything else.

Usage: python benchmarks/step_profile.py [--model vit_s16] [--loss slip] [--batch 8] [--steps 2]
           [--out benchmarks/results]
Times every ATen operator of `--steps` full steps (fwd, bwd, fused AdamW, real-length captions, freed host memory
retained: the suite's train step, `suite.training_setup`), after warm-up steps, with a dispatch-level timer: no profiler, so the allocations (and so the page
faults) are those of an ordinary step. Writes step_profile.json and step_profile.md under --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slip.models import MODEL_BUILDERS

from suite import OBJECTIVES, machine_record, training_setup  # benchmarks/suite.py, beside this script

GROUPS = {"matmul": ("mm", "addmm", "bmm"), "attention": ("_scaled_dot_product",)}


class OperatorTimer(TorchDispatchMode):
    """Wall time and call count of every ATen operator run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run the operator, adding its time to its name's total."""
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1
        return out


def group_of(operator: str) -> str:
    """matmul, attention or other."""
    for group, prefixes in GROUPS.items():
        if operator.startswith(prefixes):
            return group
    return "other"


def profile(model_name: str, loss: str, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """Per-operator and per-group time of `steps` training steps (on CPU), each timed on its own."""
    task, optimizer, batch = training_setup(torch.device("cpu"), model_name, loss, batch_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task(batch)["loss"].backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    runs = []
    for _ in range(steps):
        timer = OperatorTimer()
        start = time.perf_counter()
        with timer:
            step()
        wall = time.perf_counter() - start
        groups = collections.defaultdict(float)
        for name, seconds in timer.seconds.items():
            groups[group_of(name)] += seconds
        untimed = wall - sum(timer.seconds.values())  # Python, autograd bookkeeping, the timer itself
        top = sorted(timer.seconds.items(), key=lambda item: -item[1])[:12]
        runs.append({"wall_s": wall, "groups_s": dict(groups), "outside_operators_s": untimed,
                     "top": [{"op": name, "s": s, "calls": timer.calls[name]} for name, s in top]})
    return {"model": model_name, "objective": loss, "batch_size": batch_size, "warmup": warmup, "runs": runs}


def markdown(result: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    """Each step's share per group, and the operators of the first step."""
    lines = [f"# Where a {result['model']} {result['objective']} step's time goes\n", f"Command: `{command}`  ",
             f"Machine: {machine}\n", "| step | wall s | matmul | attention | other operators | outside operators |",
             "|---:|---:|---:|---:|---:|---:|"]
    for index, run in enumerate(result["runs"], 1):
        share = {group: run["groups_s"].get(group, 0.0) / run["wall_s"] for group in ("matmul", "attention", "other")}
        lines.append(f"| {index} | {run['wall_s']:.2f} | {100 * share['matmul']:.1f}% | {100 * share['attention']:.1f}% "
                     f"| {100 * share['other']:.1f}% | {100 * run['outside_operators_s'] / run['wall_s']:.1f}% |")
    lines += ["", "Operators of step 1, by time:\n", "| operator | ms | calls |", "|---|---:|---:|"]
    lines += [f"| {row['op']} | {1000 * row['s']:.1f} | {row['calls']} |" for row in result["runs"][0]["top"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, profile, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_s16", choices=sorted(MODEL_BUILDERS))
    parser.add_argument("--loss", default="slip", choices=sorted(OBJECTIVES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    machine = machine_record()
    result = profile(args.model, args.loss, args.batch, args.steps, args.warmup)
    command = "python benchmarks/step_profile.py " + " ".join(
        f"--{key} {value}" for key, value in [("model", args.model), ("loss", args.loss), ("batch", args.batch),
                                               ("steps", args.steps), ("warmup", args.warmup)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps({"command": command, "machine": machine, **result},
                                                           indent=2) + "\n")
    text = markdown(result, command, machine)
    (args.out / "step_profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
