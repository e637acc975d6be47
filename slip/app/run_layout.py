"""The files of a run directory, named once: training writes them; evaluation and the report find them."""
from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINT_IN_RUN", "CONFIG_FILE", "EVAL_DIR", "LOG_FILE", "RESULTS_FILE"]

CHECKPOINT_IN_RUN = Path("checkpoints") / "last.pt"  # the latest checkpoint, relative to the run directory
RESULTS_FILE = "results.json"  # training's summary: objective, steps, zero-shot, skipped samples, history
CONFIG_FILE = "config.yaml"  # the resolved config the run's results and checkpoint belong to
LOG_FILE = "train.log"  # every console line of every invocation, timestamped, appended
EVAL_DIR = "eval"  # python -m slip.eval's task JSON files for the run's checkpoint
