"""Patch dropout at equal wall time on the embedded data: the quickstart's tiny CLIP with and without it.

Usage: python experiments/patch_dropout/equal_time.py [--rate 0.5] [--steps 200] [--out experiments/patch_dropout]
1. `python -m slip.train` (the quickstart: tiny CLIP, synthetic data) for --steps steps: its wall time W;
2. the same with model.patch_dropout=RATE for --steps steps: its step rate;
3. the same with model.patch_dropout=RATE for as many steps as fit in W (the schedule spans them);
then `python -m slip.eval` (zero-shot and linear probe on the synthetic tasks) on runs 1 and 3. Writes
equal_time.json and equal_time.md under --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def train(run_dir: Path, *overrides: str) -> dict:
    """Run slip.train into `run_dir`; its results.json."""
    subprocess.run([sys.executable, "-m", "slip.train", f"output_root={run_dir.parent}", f"run_name={run_dir.name}",
                    "trainer.resume=never", *overrides], check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "results.json").read_text())


def evaluate(run_dir: Path) -> dict[str, float]:
    """Zero-shot top-1 and linear-probe top-1 of a run on the synthetic tasks (slip.eval)."""
    subprocess.run([sys.executable, "-m", "slip.eval", f"checkpoint={run_dir}", "tasks.knn=[]",
                    "tasks.retrieval=[]"], check=True, stdout=subprocess.DEVNULL)
    metrics = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        for record in json.loads(path.read_text()).get("records", []):
            if record.get("metric") in ("top1", "acc1", "accuracy"):
                metrics[f"{record.get('task')}/{record.get('metric')}"] = float(record["value"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Run the three trainings and two evaluations; write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("experiments/patch_dropout"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        plain = train(root / "plain", f"trainer.max_steps={args.steps}")
        probe = train(root / "probe", f"trainer.max_steps={args.steps}", f"model.patch_dropout={args.rate}")
        steps = round(args.steps * plain["wall_time_s"] / probe["wall_time_s"])
        dropped = train(root / "dropped", f"trainer.max_steps={steps}", f"model.patch_dropout={args.rate}")
        rows = [{"patch_dropout": 0.0, "steps": args.steps, "wall_time_s": plain["wall_time_s"],
                 "train_zeroshot_top1": plain["zeroshot"].get("top1"), **evaluate(root / "plain")},
                {"patch_dropout": args.rate, "steps": args.steps, "wall_time_s": probe["wall_time_s"],
                 "train_zeroshot_top1": probe["zeroshot"].get("top1")},
                {"patch_dropout": args.rate, "steps": steps, "wall_time_s": dropped["wall_time_s"],
                 "train_zeroshot_top1": dropped["zeroshot"].get("top1"), **evaluate(root / "dropped")}]
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    columns = sorted({key for row in rows for key in row} - {"patch_dropout", "steps", "wall_time_s"})
    lines = ["# Patch dropout at equal wall time (tiny CLIP, embedded synthetic data)", "", f"Command: `{command}`",
             "", "| patch dropout | steps | wall time s | " + " | ".join(columns) + " |",
             "|---:|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]:.1f}" if isinstance(row.get(key), float) else "–" for key in columns]
        lines.append(f"| {row['patch_dropout']} | {row['steps']} | {row['wall_time_s']:.1f} | " + " | ".join(cells)
                     + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "equal_time.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    (args.out / "equal_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
