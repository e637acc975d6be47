"""Cross-run comparison: the results of many runs -> a Markdown table, a CSV file and a grouped bar chart.

``python -m slip.report <dir> [--out DIR] [--title T] [--size WxH]`` finds every run below <dir> (a directory
with a training ``results.json`` and/or an ``eval/`` folder of task JSON files, as ``python -m slip.eval``
writes them; a Hydra multirun gives one ``<n>_<overrides>/`` directory per run) and writes ``report.md``,
``report.csv`` and ``report.png`` to --out (default: <dir>).

One row per run: its path, the swept parameters (override keys whose values differ between runs, or that only
some runs set), objective, step, then one column per metric: ``<task>/<dataset>/<metric>`` from the eval
records (``finetune/...`` from ``python -m slip.finetune``'s ``eval/finetune.json``), and ``train_zeroshot/top1``
from the training's final zero-shot evaluation. A file that cannot be read is skipped with a warning naming it;
the rest of the report is still written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slip.app.report_chart import DEFAULT_SIZE, MISSING, write_chart
from slip.app.run_layout import EVAL_DIR, RESULTS_FILE
from slip.eval.metric_names import CLIP_ONLY_DATASETS, DATASET_METRIC_NAMES, SLIP_TABLE_ORDER

__all__ = [
    "Report",
    "Run",
    "build_report",
    "find_run_dirs",
    "main",
    "parse_overrides",
    "read_run",
    "write_csv",
    "write_markdown",
    "write_report",
]

_MIN_SIDE = 200
# Column order of the tasks.
_TASK_ORDER = ("zeroshot", "linear_probe", "finetune", "knn", "retrieval", "train_zeroshot")


@dataclass
class Run:
    """One row of the report: the run's path, its Hydra overrides, objective, step and metrics."""

    name: str
    overrides: dict[str, str] = field(default_factory=dict)
    objective: str | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    """The comparison table: runs (rows), swept parameters and metrics (columns), and warnings met."""

    root: Path
    runs: list[Run]
    swept: list[str]
    metrics: list[str]
    warnings: list[str]

    @property
    def header(self) -> list[str]:
        """Column names, in table order."""
        return ["run", *self.swept, "objective", "step", *self.metrics]

    def rows(self) -> list[list[str | int | float | None]]:
        """Cell values per run, in header order; None where a run has no value."""
        return [
            [run.name, *(run.overrides.get(key) for key in self.swept), run.objective, run.step,
             *(run.metrics.get(metric) for metric in self.metrics)]
            for run in self.runs
        ]

    def label(self, run: Run) -> str:
        """A run's name in the chart: its swept parameters (its path when it has none)."""
        swept = ", ".join(f"{key}={run.overrides[key]}" for key in self.swept if key in run.overrides)
        return swept or (run.name if run.name != "." else self.root.resolve().name)


# ---------------------------------------------------------------------------------------------------------
# Reading runs


def _natural_key(text: str) -> list[str | int]:
    """Sort key that orders embedded numbers by value ("2_x" before "10_x")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _has_eval_files(folder: Path) -> bool:
    """Whether `folder` holds at least one .json file."""
    return any(path.suffix == ".json" and path.is_file() for path in folder.iterdir())


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or below `root` (holding results.json and/or eval/*.json), in natural path order."""
    found = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # Hydra's .hydra/ config copies
        has_eval = EVAL_DIR in dirs and _has_eval_files(here / EVAL_DIR)
        if has_eval:
            dirs.remove(EVAL_DIR)  # the run's own evaluation files, not runs
        if RESULTS_FILE in files or has_eval:
            found.append(here)
    return sorted(found, key=lambda path: _natural_key(path.relative_to(root).as_posix()))


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """Hydra override strings ("loss=clip", "+trainer.x=1") -> {key: value}; a bare "~key" has value ""."""
    parsed = {}
    for override in overrides:
        key, _, value = override.partition("=")
        parsed[key.lstrip("+")] = value
    return parsed


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    """The JSON object in `path`, or None after a warning naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        warnings.append(f"{path}: unreadable JSON ({reason}); skipped")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: expected a JSON object, got {type(data).__name__}; skipped")
        return None
    return data


def _is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(data: dict[str, Any], key: str, kind: type, path: Path, warnings: list[str]) -> Any:
    """data[key] if present and a `kind` (a bool never passes); None if absent or, with a warning, mistyped."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    warnings.append(f"{path}: key {key!r} is a {type(value).__name__}, not a {kind.__name__}; ignored")
    return None


def _read_training(run: Run, path: Path, warnings: list[str]) -> None:
    """Fill `run` from a training results.json: overrides, objective, step and the final zero-shot top-1."""
    data = _read_json(path, warnings)
    if data is None:
        return
    overrides = _typed(data, "overrides", list, path, warnings) or []
    if not all(isinstance(item, str) for item in overrides):
        warnings.append(f"{path}: key 'overrides' is not a list of strings; ignored")
        overrides = []
    run.overrides = parse_overrides(overrides)
    run.objective = _typed(data, "objective", str, path, warnings)
    run.step = _typed(data, "step", int, path, warnings)
    zeroshot = _typed(data, "zeroshot", dict, path, warnings) or {}
    if _is_number(zeroshot.get("top1")):
        run.metrics["train_zeroshot/top1"] = float(zeroshot["top1"])
    elif "top1" in zeroshot:
        warnings.append(f"{path}: key 'zeroshot.top1' is not a number; ignored")


def _read_eval(run: Run, path: Path, warnings: list[str]) -> None:
    """Add the records of one eval task file to `run`; objective and step fill in what training did not."""
    data = _read_json(path, warnings)
    if data is None:
        return
    records = data.get("records")
    if not isinstance(records, list):
        warnings.append(f"{path}: no 'records' list; skipped")
        return
    step = _typed(data, "step", int, path, warnings)
    if run.step is None:
        run.step = step
    elif step is not None and step != run.step:
        warnings.append(f"{path}: step {step} differs from the training's step {run.step}")
    run.objective = run.objective or _typed(data, "objective", str, path, warnings)
    file_task = data.get("task")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            warnings.append(f"{path}: records[{i}] is not an object; skipped")
            continue
        parts = [record.get("task", file_task), record.get("dataset"), record.get("metric")]
        if not all(isinstance(part, str) and part for part in parts) or not _is_number(record.get("value")):
            warnings.append(f"{path}: records[{i}] lacks a task, dataset, metric or numeric value; skipped")
            continue
        column = "/".join(parts)
        if column in run.metrics:
            warnings.append(f"{path}: records[{i}] repeats {column}; the first value is kept")
            continue
        run.metrics[column] = float(record["value"])


def read_run(run_dir: Path, root: Path, warnings: list[str]) -> Run:
    """The row of the run in `run_dir` (named by its path relative to `root`); problems go to `warnings`."""
    run = Run(name=run_dir.relative_to(root).as_posix())
    if (run_dir / RESULTS_FILE).is_file():
        _read_training(run, run_dir / RESULTS_FILE, warnings)
    eval_dir = run_dir / EVAL_DIR
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*.json"), key=lambda p: _natural_key(p.name)):
            _read_eval(run, path, warnings)
    return run


def _swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between runs (absent counts as a value), in order of appearance."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def _metric_key(column: str) -> tuple[int, list[str | int]]:
    """Column order of metrics: by task (known tasks first), then dataset and metric in natural order."""
    task = column.split("/", 1)[0]
    rank = _TASK_ORDER.index(task) if task in _TASK_ORDER else len(_TASK_ORDER)
    return rank, _natural_key(column)


def build_report(root: Path) -> Report:
    """Read every run below `root` into a table; raises FileNotFoundError or ValueError (no runs)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    run_dirs = find_run_dirs(root)
    if not run_dirs:
        raise ValueError(f"{root}: no runs found (no {RESULTS_FILE} or {EVAL_DIR}/*.json below it)")
    warnings: list[str] = []
    runs = []
    for run_dir in run_dirs:
        run = read_run(run_dir, root, warnings)
        if run.overrides or run.objective or run.step is not None or run.metrics:
            runs.append(run)
        else:  # only unreadable files: a row of blanks would just make every override look swept
            warnings.append(f"{run_dir}: nothing readable; run left out")
    if not runs:
        raise ValueError(f"{root}: none of the {len(run_dirs)} runs has readable results ({warnings[0]})")
    metrics = sorted({metric for run in runs for metric in run.metrics}, key=_metric_key)
    return Report(root, runs, _swept_keys(runs), metrics, warnings)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _markdown_cell(value: str | int | float | None) -> str:
    """A table cell: numbers with 1 decimal (steps whole), MISSING for None, pipes escaped."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def write_markdown(report: Report, path: Path, title: str, chart_name: str | None = "report.png") -> None:
    """The table as Markdown under `title`, with the chart embedded when `chart_name` is given."""
    numeric = {"step", *report.metrics}
    lines = [
        f"# {title}",
        "",
        f"{len(report.runs)} runs under `{report.root}`. Numbers are rounded to 1 decimal (report.csv has them in "
        f"full); {MISSING} means the run has no such value.",
        "",
        "| " + " | ".join(name.replace("|", "\\|") for name in report.header) + " |",
        "|" + "|".join("---:" if name in numeric else "---" for name in report.header) + "|",
        *("| " + " | ".join(_markdown_cell(value) for value in row) + " |" for row in report.rows()),
    ]
    if chart_name:
        lines += ["", f"![{title}]({chart_name})"]
    if report.warnings:
        lines += ["", "Skipped or ignored while reading:", "", *(f"- {warning}" for warning in report.warnings)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_csv(report: Report, path: Path) -> None:
    """The table as CSV at full precision (floats as their shortest exact repr); empty cells where missing."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(report.header)
        writer.writerows([["" if value is None else repr(value) if isinstance(value, float) else value
                           for value in row] for row in report.rows()])


def downstream_table(report: Report, task: str = "zeroshot") -> tuple[list[str], list[list[str | float | None]]]:
    """(header, rows) of the downstream view: a row per run, a column per dataset that `task` scored, in the
    order of SLIP's table (then CLIP's Birdsnap and VOC 2007, then others by name), each cell the dataset's own
    metric (its record besides top-1 when the task wrote one, else top-1), then the mean over the run's cells."""
    own: dict[str, str] = {}  # dataset -> the metric shown for it
    for run in report.runs:
        for column in run.metrics:
            parts = column.split("/")
            if len(parts) == 3 and parts[0] == task and parts[2] in DATASET_METRIC_NAMES:
                if parts[2] != "top1" or parts[1] not in own:
                    own[parts[1]] = parts[2]
    paper_order = SLIP_TABLE_ORDER + CLIP_ONLY_DATASETS
    datasets = sorted(own, key=lambda name: (paper_order.index(name) if name in paper_order else len(paper_order),
                                             name))
    header = ["run", *(f"{name} ({own[name]})" if own[name] != "top1" else name for name in datasets), "mean"]
    rows = []
    for run in report.runs:
        cells = [run.metrics.get(f"{task}/{name}/{own[name]}") for name in datasets]
        present = [cell for cell in cells if cell is not None]
        rows.append([run.name, *cells, sum(present) / len(present) if present else None])
    return header, rows


DOWNSTREAM_TASKS = ("zeroshot", "linear_probe")  # the tasks the downstream view tabulates, in this order


def write_downstream(report: Report, path: Path, title: str) -> bool:
    """downstream.md: a section per task of DOWNSTREAM_TASKS with records, each its downstream view; whether any
    task had records (else nothing is written)."""
    lines = [f"# {title}: each dataset's own metric", "",
             "Columns in the order of SLIP's downstream table (CLIP-only sets and others after); a dataset scored by "
             "another metric than top-1 names it; `mean` is over the run's cells."]
    for task in DOWNSTREAM_TASKS:
        header, rows = downstream_table(report, task)
        if len(header) > 2:
            lines += ["", f"## {task}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
                      *("| " + " | ".join(_markdown_cell(value) for value in row) + " |" for row in rows)]
    if not any(line.startswith("## ") for line in lines):
        return False
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return True


def write_report(report: Report, out_dir: Path, title: str, size: tuple[int, int] = DEFAULT_SIZE) -> list[Path]:
    """Write report.md, report.csv and report.png into `out_dir` (created if needed), and downstream.md where
    runs were evaluated on downstream datasets; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.md", out_dir / "report.csv", out_dir / "report.png"]
    write_markdown(report, paths[0], title, paths[2].name)
    write_csv(report, paths[1])
    write_chart(report, paths[2], title, size)
    if write_downstream(report, out_dir / "downstream.md", title):
        paths.append(out_dir / "downstream.md")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Command line


def _size(text: str) -> tuple[int, int]:
    """Parse "WIDTHxHEIGHT" in pixels."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or min(int(match[1]), int(match[2])) < _MIN_SIDE:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, each >= {_MIN_SIDE}, got {text!r}")
    return int(match[1]), int(match[2])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: build the report of a directory of runs and write it; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m slip.report", description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="directory to search for runs (e.g. a Hydra multirun dir)")
    parser.add_argument("--out", type=Path, help="where to write report.md/.csv/.png (default: DIR)")
    parser.add_argument("--title", help="title of the table and chart (default: the directory name)")
    parser.add_argument("--size", type=_size, default=DEFAULT_SIZE, metavar="WxH",
                        help="chart size in pixels (default: 1200x600)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dir)
        for warning in report.warnings:
            print(f"slip.report: warning: {warning}", file=sys.stderr)
        title = args.title or f"Run comparison: {args.dir.resolve().name}"
        paths = write_report(report, args.out or args.dir, title, args.size)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"slip.report: error: {error}", file=sys.stderr)
        return 2
    print(f"slip.report: {len(report.runs)} runs; wrote " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
