"""The L-BFGS linear probe against scikit-learn's LogisticRegression (lbfgs, multinomial) on issue 24's problem size.

Usage: python benchmarks/probe_vs_sklearn.py [--rounds 3] [--before PATH [--before-label TEXT]]
           [--out benchmarks/results] [--render JSON]

Features: a seeded Gaussian mixture of 5,664 train rows x 192 dims in 98 classes (issue 24's task), with a power-law
covariance (eigenvalue k proportional to k^-2, as embeddings have), class means drawn in the same spectrum, an
isotropic noise floor and an offset; the test split is drawn the same way. Both solvers get the same protocol:
the stratified 20% validation split, the standardisation, the l2 grid (1e2 .. 1e-6 by decades) with 4 bisection
refinements, warm starts from the nearest fitted l2, the same validation ranking, and the refit on all of train
(`slip.eval.linear_probe.sweep_l2_and_refit`). scikit-learn's C is 1 / (l2 N), which makes its objective ours
(tests/test_linear_probe.py). It runs with its default tol (1e-4 on the mean loss's gradient) and with tol = 1e-4 l2,
our stopping rule (and that of the scikit-learn CLIP used).

Each configuration runs `--rounds` times, the solvers taking turns within a round; wall times are medians. Thread
modes: "caller's" leaves torch's and scikit-learn's thread pools as the process has them (our probe then picks its
own count per fit), "1" limits both to one thread. `--before PATH` adds a copy of linear_probe.py from before issue
24 (e.g. `git show 7705a1a:slip/eval/linear_probe.py > /tmp/linear_probe_before.py`): its single l2 = 1e-3 fit in
both modes, and its sweep with one thread (with the caller's two threads it takes about ten times as long).
Writes probe_vs_sklearn.json and probe_vs_sklearn.md under --out; `--render JSON` measures nothing and writes an
earlier run's page again (with `--before-label` naming its --before file).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from suite import machine_record, results_header, write_results

TRAIN_ROWS, DIMS, CLASSES = 5664, 192, 98
SINGLE_FIT_L2 = 1e-3
BEFORE = "ours before issue 24"


def mixture(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features [rows, DIMS] and labels of the benchmark's Gaussian mixture (fixed layout, seeded draws)."""
    layout = torch.Generator().manual_seed(1234)
    spectrum = torch.arange(1, DIMS + 1, dtype=torch.float64) ** -1.0
    basis, _ = torch.linalg.qr(torch.randn(DIMS, DIMS, generator=layout, dtype=torch.float64))
    means = 0.5 * torch.randn(CLASSES, DIMS, generator=layout, dtype=torch.float64) * spectrum
    offset = 3.0 * torch.randn(DIMS, generator=layout, dtype=torch.float64)
    draws = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % CLASSES
    within = torch.randn(rows, DIMS, generator=draws, dtype=torch.float64) * spectrum
    floor = 0.05 * torch.randn(rows, DIMS, generator=draws, dtype=torch.float64)
    return ((means[labels] + within) @ basis.T + offset + floor).float(), labels


def load_module(path: Path) -> ModuleType:
    """A linear_probe.py from another commit, imported under its own name."""
    spec = importlib.util.spec_from_file_location("linear_probe_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--before: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def thread_mode(mode: str) -> Iterator[None]:
    """The caller's thread pools as they are, or torch and scikit-learn's pools limited to one thread."""
    from threadpoolctl import threadpool_limits

    if mode != "1":
        yield
        return
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(caller)


def counting_evaluations(module: ModuleType) -> list[int]:
    """Count the loss evaluations of `module`'s multinomial fits (wraps its module-level loss)."""
    counter = [0]
    loss = module._regularised_loss

    def counted(*args: Any) -> Any:
        counter[0] += 1
        return loss(*args)

    module._regularised_loss = counted
    return counter


def sklearn_fit(tol: Callable[[float], float], max_iter: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The sweep's fit(x, labels, l2, init) by LogisticRegression(lbfgs) with C = 1 / (l2 N), warm-started at init."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def fit(x: torch.Tensor, labels: torch.Tensor, l2: float, init: Any) -> tuple[torch.Tensor, torch.Tensor]:
        model = LogisticRegression(C=1.0 / (l2 * len(labels)), tol=tol(l2), max_iter=max_iter,
                                   warm_start=init is not None)
        if init is not None:
            model.coef_, model.intercept_ = init[0].double().numpy(), init[1].double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x.numpy(), labels.numpy())
        return torch.from_numpy(model.coef_).to(x), torch.from_numpy(model.intercept_).to(x)

    return fit


def sklearn_probe(probe: ModuleType, fit: Callable[..., Any], train: tuple, test: tuple) -> dict[str, float]:
    """`linear_probe`'s protocol with scikit-learn fitting each point."""
    from slip.eval.l2_sweep import L2Sweep, sweep_l2_and_refit
    from slip.eval.metrics import topk_accuracy

    fit_rows, val_rows = probe.stratified_split(train[1], 0.2, 0)
    logits, best, scores = sweep_l2_and_refit(fit, probe.top1_then_loss, train, fit_rows, val_rows, test[0],
                                              L2Sweep())
    return {"l2": best, "val_top1": scores[best][0], "top1": topk_accuracy(logits, test[1], (1,))["top1"]}


def alternate(runs: dict[str, Callable[[], dict[str, Any]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each run `rounds` times, taking turns within a round: median and per-round seconds, and the last result."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[str, Any]] = {}
    for round_index in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
            print(f"round {round_index + 1}/{rounds} {name}: {seconds[name][-1]:.2f} s {results[name]}",
                  file=sys.stderr, flush=True)
    return {name: {"seconds": statistics.median(seconds[name]), "rounds": seconds[name], **results[name]}
            for name in runs}


def single_fit(module: ModuleType, counter: list[int], x: torch.Tensor,
               y: torch.Tensor) -> Callable[[], dict[str, Any]]:
    """One cold fit at SINGLE_FIT_L2 on the standardised rows: its loss evaluations (`counter`) and its float64
    gradient."""

    def run() -> dict[str, Any]:
        counter[0] = 0
        weight, bias = module.fit_logistic_regression(x, y, CLASSES, SINGLE_FIT_L2)
        weight, bias = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(x.double() @ weight.T + bias, y)
        (loss + 0.5 * SINGLE_FIT_L2 * weight.square().sum()).backward()
        return {"evaluations": counter[0],
                "max_gradient": max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))}

    return run


def measure(rounds: int, before: ModuleType | None, max_iter: int) -> dict[str, Any]:
    """Single fits and full sweeps in both thread modes."""
    import slip.eval.linear_probe as after
    from slip.eval.features import standardize
    from slip.eval.l2_sweep import L2Sweep

    train, test = mixture(TRAIN_ROWS, seed=0), mixture(30 * CLASSES, seed=1)
    fit_rows, _ = after.stratified_split(train[1], 0.2, 0)
    fit_x = standardize(train[0][fit_rows])(train[0][fit_rows])
    implementations = {"ours": after, **({BEFORE: before} if before else {})}
    counters = {name: counting_evaluations(module) for name, module in implementations.items()}
    single, sweeps = {}, {}
    for mode in ("caller's", "1"):
        with thread_mode(mode):
            single[mode] = alternate({name: single_fit(module, counters[name], fit_x, train[1][fit_rows])
                                      for name, module in implementations.items()}, rounds)
            runs: dict[str, Callable[[], dict[str, Any]]] = {
                "ours": lambda: {key: value for key, value in after.linear_probe(
                    *train, *test, CLASSES, L2Sweep(max_iter=max_iter)).items() if key in ("l2", "val_top1", "top1")}}
            if before and mode == "1":
                runs[BEFORE] = lambda: {key: value for key, value in before.linear_probe(
                    *train, *test, CLASSES, max_iter=max_iter).items() if key in ("l2", "val_top1", "top1")}
            runs["scikit-learn, tol 1e-4"] = lambda: sklearn_probe(
                after, sklearn_fit(lambda l2: 1e-4, max_iter), train, test)
            runs["scikit-learn, tol 1e-4 l2 (ours)"] = lambda: sklearn_probe(
                after, sklearn_fit(lambda l2: 1e-4 * l2, max_iter), train, test)
            sweeps[mode] = alternate(runs, rounds)
    return {"single_fit": single, "sweep": sweeps}


def markdown(payload: dict[str, Any]) -> str:
    """The single-fit and sweep tables, with each solver's distance from ours."""
    lines = [*results_header("Linear probe against scikit-learn's LogisticRegression (lbfgs, multinomial)",
                             payload["command"], payload["machine"]),
             f"Features: a seeded Gaussian mixture, {TRAIN_ROWS} train and {payload['test_rows']} test rows x {DIMS} "
             f"dims, {CLASSES} classes (see the script's docstring). Median of {payload['rounds_each']} rounds, "
             "solvers taking turns; \"caller's\" threads: the process's pools as they are (torch's "
             f"{payload['machine']['threads']}); our probe picks its own count per fit.", "",
             f"One fit at l2 = {SINGLE_FIT_L2:g} from zeros on the standardised fit rows (issue 24's case):", "",
             "| threads | solver | seconds | loss evaluations | max gradient (float64) |", "|---|---|---:|---:|---:|"]
    for mode, rows in payload["single_fit"].items():
        lines += [f"| {mode} | {name} | {row['seconds']:.2f} | {row['evaluations']} | {row['max_gradient']:.1e} |"
                  for name, row in rows.items()]
    lines += ["", "The whole probe (up to 17 sweep fits and the refit):", "",
              "| threads | solver | seconds | x ours | chosen l2 | val top-1 | test top-1 | vs ours |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, rows in payload["sweep"].items():
        ours = rows["ours"]
        lines += [f"| {mode} | {name} | {row['seconds']:.1f} | {row['seconds'] / ours['seconds']:.2f} | "
                  f"{row['l2']:.3g} | {row['val_top1']:.2f} | {row['top1']:.2f} | {row['top1'] - ours['top1']:+.2f} |"
                  for name, row in rows.items()]
    if any(BEFORE in rows for rows in payload["single_fit"].values()):
        label = payload.get("before_label") or payload.get("before") or "the --before file"
        lines += ["", f"`{BEFORE}`: {label}, on the same features; with the caller's threads only its single fit "
                  "was timed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, help="linear_probe.py from before issue 24")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit, for both solvers")
    parser.add_argument("--before-label", default=None, help="how the page names the --before file")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: write an earlier run's probe_vs_sklearn.json and its page into --out")
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        if args.before_label:
            payload["before_label"] = args.before_label
        write_results(args.out, "probe_vs_sklearn", payload, markdown(payload))
        print(markdown(payload))
        return
    before = load_module(args.before) if args.before else None
    machine = machine_record("cpu")
    results = measure(args.rounds, before, args.max_iter)
    command = "python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "machine": machine, "rounds_each": args.rounds, "test_rows": 30 * CLASSES,
               "before": str(args.before) if args.before else None, "before_label": args.before_label, **results}
    text = markdown(payload)
    write_results(args.out, "probe_vs_sklearn", payload, text)
    print(text)


if __name__ == "__main__":
    main()
