"""How far exact accumulation's run drifts from the whole-batch run over many steps, in fp32 and in float64.

Usage: python benchmarks/accumulation_drift.py [--steps 20] [--loss slip] [--out benchmarks/results]
Two `slip.train` runs per precision on the embedded data (tiny ViT, 64 samples, so the steps cross epoch
boundaries and the warm-up): `data.batch_size=16` against `data.batch_size=8 trainer.update_freq=2`, the same
16 samples per step. Per step, the relative difference of their losses; at the end, the largest relative
difference of any weight tensor (`relative_errors` below). The fp32 runs are also compared with the float64
whole-batch run: how far each fp32 trajectory is from the exact-arithmetic one. Writes accumulation_drift.json
and accumulation_drift.md under --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from suite import machine_record, results_header, write_results

CONF = Path(__file__).resolve().parent.parent / "conf"
COMMON = ["experiment=debug", "data.source.num_samples=64", "val=none", "trainer.log_every=1",
          "trainer.log_images=false", "trainer.save_every=0", "run_name=drift"]
LAYOUTS = {"whole": ["data.batch_size=16"], "exact": ["data.batch_size=8", "trainer.update_freq=2"]}


def _run(overrides: list[str], run_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(loss per step, final weights) of one slip.train run."""
    from hydra import compose, initialize_config_dir

    from slip.checkpoint import read_checkpoint
    from slip.app.run_layout import CHECKPOINT_IN_RUN
    from slip.app.train import train

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    results = train(cfg, run_dir)
    return [row["loss"] for row in results["history"]], read_checkpoint(run_dir / CHECKPOINT_IN_RUN)["model"]


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per floating-point tensor ||got - want|| / ||want||, the norm floored at 1e-4 of all of `want`'s (a tensor
    that is zero in exact arithmetic reads as rounding noise, not as an infinite error)."""
    floats = {name: value.double() for name, value in want.items() if value.is_floating_point()}
    floor = 1e-4 * float(torch.linalg.vector_norm(torch.cat([value.flatten() for value in floats.values()])))
    return {name: float(torch.linalg.vector_norm(got[name].double() - value)) /
            max(float(torch.linalg.vector_norm(value)), floor) for name, value in floats.items()}


def _loss_differences(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def measure(steps: int, loss: str) -> dict[str, Any]:
    """Losses and final weights of both layouts in fp32 and fp64, and their differences."""
    runs: dict[tuple[str, str], tuple[list[float], dict[str, torch.Tensor]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for precision in ("fp32", "fp64"):
            for layout, overrides in LAYOUTS.items():
                runs[precision, layout] = _run(
                    [*COMMON, f"loss={loss}", f"trainer.max_steps={steps}", f"trainer.precision={precision}",
                     *overrides], Path(root) / f"{precision}-{layout}")
    reference_losses, reference_weights = runs["fp64", "whole"]
    comparisons = {
        "fp32 exact vs fp32 whole": (runs["fp32", "exact"], runs["fp32", "whole"]),
        "fp64 exact vs fp64 whole": (runs["fp64", "exact"], runs["fp64", "whole"]),
        "fp32 whole vs fp64 whole": (runs["fp32", "whole"], runs["fp64", "whole"]),
        "fp32 exact vs fp64 whole": (runs["fp32", "exact"], runs["fp64", "whole"]),
    }
    rows = []
    for name, ((losses, weights), (want_losses, want_weights)) in comparisons.items():
        per_step = _loss_differences(losses, want_losses)
        errors = relative_errors(weights, want_weights)
        tensor = max(errors, key=errors.__getitem__)
        rows.append({"comparison": name, "loss_rel_per_step": per_step, "worst_loss_rel": max(per_step),
                     "first_step_over_1e-6": next((i + 1 for i, d in enumerate(per_step) if d > 1e-6), None),
                     "worst_weight_rel": errors[tensor], "worst_weight": tensor})
    return {"steps": steps, "loss": loss, "rows": rows, "fp64_losses": reference_losses}


def render(payload: dict[str, Any], command: str) -> str:
    """The results page."""
    lines = results_header("Exact accumulation over many steps: update_freq 2 x 8 against batch 16", command,
                           payload["machine"])
    lines += [f"{payload['steps']} steps of `loss={payload['loss']}` on the tiny ViT (64 synthetic samples: 4 steps "
              "an epoch, 1 warm-up epoch). Loss differences are relative, per step; weights: the largest relative "
              "difference of any tensor (norm floored at 1e-4 of all weights).", "",
              "| comparison | steps 1-3 worst loss diff | worst loss diff | first step > 1e-6 | worst weight diff "
              "(tensor) |", "|---|---:|---:|---:|---|"]
    for row in payload["rows"]:
        lines.append(f"| {row['comparison']} | {max(row['loss_rel_per_step'][:3]):.1e} | {row['worst_loss_rel']:.1e}"
                     f" | {row['first_step_over_1e-6'] or '-'} | {row['worst_weight_rel']:.1e} "
                     f"(`{row['worst_weight']}`) |")
    lines += ["", "Per-step loss differences:", "", "| step | " + " | ".join(r["comparison"] for r in payload["rows"])
              + " |", "|---:|" + "---:|" * len(payload["rows"])]
    for step in range(payload["steps"]):
        lines.append(f"| {step + 1} | " + " | ".join(f"{r['loss_rel_per_step'][step]:.1e}" for r in payload["rows"])
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure and write the results page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", default="slip")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    command = "python benchmarks/accumulation_drift.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    payload = {**measure(args.steps, args.loss), "machine": machine_record()}
    write_results(args.out, "accumulation_drift", payload, render(payload, command.strip()))
    print(render(payload, command.strip()))


if __name__ == "__main__":
    main()
