"""The files of a run directory, named once: training writes them; evaluation and the report find them."""
from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINT_IN_RUN", "EVAL_DIR", "RESULTS_FILE"]

CHECKPOINT_IN_RUN = Path("checkpoints") / "last.pt"  # the latest checkpoint, relative to the run directory
RESULTS_FILE = "results.json"  # training's summary: objective, steps, zero-shot, skipped samples, history
EVAL_DIR = "eval"  # python -m slip.eval's task JSON files for the run's checkpoint
