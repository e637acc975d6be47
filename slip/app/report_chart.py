"""The report's grouped bar chart: one group per accuracy or recall column, one bar per run."""
from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slip.app.report import Report

__all__ = ["DEFAULT_SIZE", "MAX_CHART_GROUPS", "chart_metrics", "write_chart"]

DEFAULT_SIZE = (1200, 600)
MAX_CHART_GROUPS = 8
MISSING = "–"  # a value a run lacks, in the table and on the bars
# The chart's first choices, most important first: (task, metric).
_CHART_FIRST = (("zeroshot", "top1"), ("linear_probe", "top1"), ("knn", "top1"), ("retrieval", "R@1"),
                ("train_zeroshot", "top1"))
_PERCENT_METRIC = re.compile(r"(?:^|_)(top\d+|R@\d+|acc|accuracy)$")


def chart_metrics(metrics: Sequence[str], limit: int = MAX_CHART_GROUPS) -> list[str]:
    """The accuracy/recall columns to plot, most important first (zero-shot, linear probe, kNN top-1, R@1)."""
    def metric_name(column: str) -> str:
        return column.rsplit("/", 1)[-1]

    def task(column: str) -> str:
        return column.split("/", 1)[0]

    percent = [column for column in metrics if _PERCENT_METRIC.search(metric_name(column))]
    first = [column for wanted_task, wanted in _CHART_FIRST for column in percent
             if task(column) == wanted_task and re.search(rf"(?:^|_){re.escape(wanted)}$", metric_name(column))]
    rest = [column for column in percent if column not in first]
    return (first + rest)[:limit]


def _tick_label(column: str) -> str:
    """A metric column as a short multi-line tick label ("retrieval/coco/image_to_text_R@1" -> 3 lines)."""
    parts = [part.replace("_to_", "→").replace("_", " ") for part in column.split("/")]
    return "\n".join(textwrap.fill(part, 12) for part in parts)


def write_chart(report: Report, path: Path, title: str, size: tuple[int, int] = DEFAULT_SIZE) -> None:
    """A grouped bar chart (one group per chart metric, one bar per run) as a PNG of `size` pixels."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    groups = chart_metrics(report.metrics)
    if not groups:
        axes.text(0.5, 0.5, "no accuracy or recall metrics to plot", ha="center", va="center")
        axes.set_axis_off()
        figure.savefig(path, dpi=dpi)
        return
    labels = [report.label(run) for run in report.runs]
    labels = [label if labels.count(label) == 1 else f"{label} ({run.name})" for label, run in zip(labels, report.runs)]
    labels = [textwrap.fill(label, 40) for label in labels]
    runs = len(report.runs)
    width = 0.8 / runs
    colors = colormaps["tab10" if runs <= 10 else "tab20"]
    rotate = runs * len(groups) > 24  # narrow bars: vertical value labels
    values = [[run.metrics.get(group, math.nan) for group in groups] for run in report.runs]
    for i, (label, row) in enumerate(zip(labels, values)):
        positions = [g + (i - (runs - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, [0.0 if math.isnan(v) else v for v in row], width, label=label,
                        color=colors(i % colors.N))
        axes.bar_label(bars, labels=[MISSING if math.isnan(v) else f"{v:.1f}" for v in row], padding=2,
                       fontsize=8 if rotate else 9, rotation=90 if rotate else 0)
    top = max((v for row in values for v in row if not math.isnan(v)), default=0.0)
    axes.set_ylim(0, max(top * (1.25 if rotate else 1.12), 1.0))
    axes.set_xticks(range(len(groups)), [_tick_label(group) for group in groups], fontsize=9)
    axes.set_ylabel("%")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    figure.savefig(path, dpi=dpi)
