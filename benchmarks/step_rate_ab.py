"""The train-step rate of two source trees, taking turns: `benchmarks/suite.py --sections train` of each tree, run
with that tree's own code, round after round, so that drift in the machine's speed hits both alike.

    git worktree add /tmp/slip-before <commit>
    python benchmarks/step_rate_ab.py --before /tmp/slip-before --rounds 3 --models vit_s16 --objectives slip

Writes benchmarks/results/step_rate_ab.{json,md}: img/s of every round, and each tree's median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
AFTER = HERE.parent


def step_rates(tree: Path, models: str, objectives: str, device: str) -> dict[str, float]:
    """{"model/objective": img/s} from one train-section run of `tree`'s suite on `tree`'s code."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(tree / "benchmarks" / "suite.py"), "--sections", "train", "--models",
                        models, "--objectives", objectives, "--device", device, "--out", out],
                       cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        record = json.loads((Path(out) / "suite.json").read_text())
    return {f"{row['model']}/{row['objective']}": row["images_per_s"] for row in record["train_step"]}


def main(argv: list[str] | None = None) -> None:
    """Alternate the two trees for --rounds rounds; write the rates and medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other tree (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="vit_s16")
    parser.add_argument("--objectives", default="slip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": AFTER}
    rounds: list[dict[str, dict[str, float]]] = []
    for number in range(args.rounds):
        order = list(trees) if number % 2 == 0 else list(reversed(trees))
        rounds.append({name: step_rates(trees[name], args.models, args.objectives, args.device) for name in order})
        print(f"round {number + 1}: {rounds[-1]}", flush=True)
    cases = sorted(rounds[0]["before"])
    medians = {name: {case: statistics.median(r[name][case] for r in rounds) for case in cases} for name in trees}
    command = "python benchmarks/step_rate_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    before_commit = subprocess.run(["git", "-C", str(trees["before"]), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip()
    after_commit = subprocess.run(["git", "-C", str(AFTER), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()
    record = {"command": command, "before": before_commit, "after": after_commit, "rounds": rounds,
              "medians": medians}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_rate_ab.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Train-step rate, two trees taking turns\n", f"Command: `{command}`  \n",
             f"Trees: before {before_commit}, after {after_commit} (plus any uncommitted changes), each running its "
             f"own `benchmarks/suite.py --sections train` on its own code, {args.rounds} rounds, order alternating. "
             f"Device: {args.device}.\n",
             "| case | before img/s (median) | after img/s (median) | after / before | rounds before | rounds after |",
             "|---|---:|---:|---:|---|---|"]
    for case in cases:
        before, after = medians["before"][case], medians["after"][case]
        each = {name: ", ".join(f"{r[name][case]:.3g}" for r in rounds) for name in trees}
        lines.append(f"| {case} | {before:.3g} | {after:.3g} | {after / before:.3f} | {each['before']} | "
                     f"{each['after']} |")
    (args.out / "step_rate_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
