"""The fine-tuning step rate as a ratio to the pretraining step rate of the same tower, on CPU: `python -m slip.train`
(CLIP, then SLIP) and `python -m slip.finetune` of its checkpoint, at the same batch, taking turns round after round.

    python benchmarks/finetune_step_rate.py --rounds 3

Each run's img/s is the median of its per-step progress lines (train.log), less the first --warmup and the last
--tail steps; each arm's figure is the median over rounds. Writes benchmarks/results/finetune_step_rate.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ARMS = ("clip", "finetune", "slip")  # cyclically rotated per round, so each arm takes each place in turn
STEP_LINE = re.compile(r"step (\d+)/(\d+) .*?img/s ([0-9.eE+-]+)")


def train_command(objective: str, batch_size: int, steps: int, out: Path, name: str) -> list[str]:
    """The pretraining command of the tiny ViT with `objective` (clip | slip), no validation or saves mid-run."""
    return [sys.executable, "-m", "slip.train", f"loss={objective}", f"data.batch_size={batch_size}",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.log_images=false", "val=none",
            "trainer.save_every=0", f"output_root={out}", f"run_name={name}"]


def finetune_command(checkpoint: Path, batch_size: int, steps: int, out: Path, name: str) -> list[str]:
    """The fine-tuning command of `checkpoint`'s image tower with the CPU recipe, no evaluation or saves mid-run."""
    return [sys.executable, "-m", "slip.finetune", f"checkpoint={checkpoint}", "recipe=cpu",
            f"data.batch_size={batch_size}", f"trainer.max_steps={steps}", "trainer.log_every=1",
            "trainer.log_images=false", "trainer.eval_every=null", "trainer.save_every=0", f"output_root={out}",
            f"run_name={name}"]


def run_app(command: list[str]) -> float:
    """Run `command` from the repository root (default threads); its wall time in seconds. Raises with its tail."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def step_rates(run_dir: Path) -> dict[int, float]:
    """{step: img/s} from the progress lines of `run_dir`'s train.log (the engine's images x world / step time)."""
    rates: dict[int, float] = {}
    for line in (run_dir / "train.log").read_text().splitlines():
        match = STEP_LINE.search(line)
        if match:
            rates[int(match.group(1))] = float(match.group(3))
    return rates


def steady_median(rates: dict[int, float], warmup: int, tail: int) -> float:
    """The median img/s of the steps after the first `warmup` and before the last `tail`."""
    last = max(rates)
    kept = [rate for step, rate in rates.items() if warmup < step <= last - tail]
    if not kept:
        raise ValueError(f"no steps left after dropping {warmup} warm-up and {tail} tail steps of {last}")
    return statistics.median(kept)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_info() -> str:
    """torch's version and its default intra-op thread count (what the runs use: nothing is set)."""
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads by default"


def measure(rounds: int, batch_size: int, steps: int, warmup: int, tail: int,
            out: Path) -> list[dict[str, dict[str, float]]]:
    """Run the arms for `rounds` rounds in rotating order; per round and arm its steady img/s and wall seconds.
    The fine-tune takes the newest CLIP pretraining run (the SLIP run's image tower is the same tiny ViT)."""
    results: list[dict[str, dict[str, float]]] = []
    clip_run: Path | None = None
    for number in range(rounds):
        shift = number % len(ARMS)
        order = ARMS[shift:] + ARMS[:shift]
        if clip_run is None and order[0] != "clip":
            order = ("clip",) + tuple(arm for arm in order if arm != "clip")
        measured: dict[str, dict[str, float]] = {}
        for arm in order:
            name = f"r{number + 1}-{arm}"
            if arm == "finetune":
                assert clip_run is not None
                command = finetune_command(clip_run, batch_size, steps, out, name)
            else:
                command = train_command(arm, batch_size, steps, out, name)
            seconds = run_app(command)
            rates = step_rates(out / name)
            measured[arm] = {"img_s": steady_median(rates, warmup, tail), "wall_s": seconds}
            if arm == "clip":
                clip_run = out / name
            print(f"round {number + 1} {arm}: {measured[arm]['img_s']:.3g} img/s (steps {warmup + 1}.."
                  f"{max(rates) - tail} of {max(rates)}: {', '.join(f'{r:.3g}' for r in rates.values())}), "
                  f"{seconds:.0f} s", flush=True)
        results.append(measured)
    return results


def report(results: list[dict[str, dict[str, float]]], command: str, args: argparse.Namespace, started: datetime,
           runtime_s: float, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[str, str]:
    """The Markdown table alone (printed) and the whole results file around it."""
    medians = {arm: statistics.median(r[arm]["img_s"] for r in results) for arm in ARMS}
    table = ["| pretraining objective | pretraining img/s (median) | fine-tuning img/s (median) | "
             "ratio fine-tune / pretrain |", "|---|---:|---:|---:|"]
    for objective in ("clip", "slip"):
        table.append(f"| {objective} | {medians[objective]:.3g} | {medians['finetune']:.3g} | "
                     f"{medians['finetune'] / medians[objective]:.2f} |")
    per_round = ["| round | order | clip img/s | fine-tune img/s | slip img/s | fine-tune / clip | fine-tune / slip |",
                 "|---:|---|---:|---:|---:|---:|---:|"]
    for number, r in enumerate(results, 1):
        order = ", ".join(r)
        per_round.append(f"| {number} | {order} | {r['clip']['img_s']:.3g} | {r['finetune']['img_s']:.3g} | "
                         f"{r['slip']['img_s']:.3g} | {r['finetune']['img_s'] / r['clip']['img_s']:.2f} | "
                         f"{r['finetune']['img_s'] / r['slip']['img_s']:.2f} |")
    ratios = {arm: [r["finetune"]["img_s"] / r[arm]["img_s"] for r in results] for arm in ("clip", "slip")}
    per_round.append(f"| median | | {medians['clip']:.3g} | {medians['finetune']:.3g} | {medians['slip']:.3g} | "
                     f"{statistics.median(ratios['clip']):.2f} | {statistics.median(ratios['slip']):.2f} |")
    cores = os.cpu_count() or 1
    if loads[0][0] >= 0.5 * cores:
        shared = (f"**The machine was shared**: other work (a long experiment) ran on the same {cores} cores "
                  f"throughout (load average {loads[0][0]:.1f} before the first run), so absolute img/s are low "
                  "and noisy; the arms took turns (order rotated each round) so that drift hits all alike, and the "
                  "ratios are the figures to read.\n")
    else:
        shared = f"The machine looked idle at the start (load average {loads[0][0]:.1f} on {cores} cores).\n"
    spread = (f"Spread: the per-round ratios run {min(ratios['clip']):.2f} to {max(ratios['clip']):.2f} "
              f"(fine-tune / CLIP) and {min(ratios['slip']):.2f} to {max(ratios['slip']):.2f} (fine-tune / SLIP); "
              "the table's ratios are of the medians over rounds, the last row above gives the medians of the "
              "per-round ratios.")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load_start, load_end = (", ".join(f"{value:.2f}" for value in load) for load in loads)
    lines = [
        "# Fine-tuning step rate as a ratio to pretraining, same tower (CPU)\n",
        f"Command: `{command}`  ",
        f"Date: {started.isoformat(sep=' ', timespec='seconds')}; runtime {runtime_s / 60:.1f} min  ",
        f"Machine: `nproc` {os.cpu_count()}, {cpu_model()}; {torch_info()}; tree {commit} (plus any uncommitted "
        f"changes)  ",
        f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}\n",
        shared,
        f"Method: the tiny ViT (`model=tiny`, 32 px) at batch {args.batch_size}, `trainer.max_steps={args.steps}`, "
        "one progress line per step (`trainer.log_every=1`), OMP/torch threads left at their defaults. "
        "Pretraining: `python -m slip.train loss=clip|slip` on the embedded synthetic data (its default "
        "`data.num_workers=1`), `val=none`. Fine-tuning: `python -m slip.finetune recipe=cpu "
        "trainer.eval_every=null` of the newest CLIP pretraining run's checkpoint (the SLIP run's image tower is "
        "the same tiny ViT, so its fine-tuning step is the same); its test-split evaluation at the end is not "
        "part of any step. A run's img/s is the median of the per-step `img/s` in its train.log (the engine's "
        f"images x world / step time, data wait included), less the first {args.warmup} steps (warm-up) and "
        f"the last {args.tail} (in trial runs the last 2 to 3 pretraining steps ran up to 5x faster than the "
        "steady state); "
        "each figure below is the median over rounds.\n",
        *table,
        "",
        "Per round (each run's steady median):\n",
        *per_round,
        "",
        spread,
        "",
        "Why: per image, a fine-tuning step runs the image tower on one view plus a linear head, a CLIP "
        "pretraining step runs the image tower on one view and the text tower on its caption, and a SLIP step "
        "runs the image tower on three views (one CLIP view, two SSL views) as well as the text tower, so "
        "fine-tuning does the least model work of the three and SLIP the most; what the ratios show beyond that "
        "is the data pipeline (images rendered and augmented by one loader worker beside the step in pretraining, "
        "inline and inside the step time in fine-tuning) and the contention for the cores.",
    ]
    return "\n".join(table), "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure the three arms over --rounds rounds; print the table and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of a run left out")
    parser.add_argument("--tail", type=int, default=3, help="last steps of a run left out")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "finetune_step_rate.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/finetune_step_rate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started, clock, load_start = datetime.now(), time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="finetune_step_rate-") as out:
        results = measure(args.rounds, args.batch_size, args.steps, args.warmup, args.tail, Path(out))
    runtime = time.perf_counter() - clock
    table, text = report(results, command.strip(), args, started, runtime, (load_start, os.getloadavg()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(table)
    print(f"runtime {runtime / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
