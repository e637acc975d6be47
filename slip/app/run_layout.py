"""The files of a run directory, named once: training writes them; evaluation and the report find them."""
from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINT_IN_RUN", "CHECKPOINTS_IN_RUN", "CONFIG_FILE", "EVAL_DIR", "LOG_FILE", "RESULTS_FILE",
           "SHARDED_CHECKPOINT_IN_RUN", "latest_checkpoint", "run_dir_of"]

CHECKPOINT_IN_RUN = Path("checkpoints") / "last.pt"  # the latest checkpoint, relative to the run directory
SHARDED_CHECKPOINT_IN_RUN = Path("checkpoints") / "last.dcp"  # ... of a trainer.strategy=fsdp run: a directory
CHECKPOINTS_IN_RUN = (CHECKPOINT_IN_RUN, SHARDED_CHECKPOINT_IN_RUN)
RESULTS_FILE = "results.json"  # training's summary: objective, steps, zero-shot, skipped samples, history
CONFIG_FILE = "config.yaml"  # the resolved config the run's results and checkpoint belong to
LOG_FILE = "train.log"  # every console line of every invocation, timestamped, appended
EVAL_DIR = "eval"  # python -m slip.eval's task JSON files for the run's checkpoint


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest checkpoint: last.pt, or last.dcp after a sharded save (a save removes the other; should a
    crash leave both, the newer); None when it has none."""
    from slip.sharded_checkpoint import existing_checkpoint  # torch: not for the report, which imports this module

    found = [path for path in (existing_checkpoint(run_dir / name) for name in CHECKPOINTS_IN_RUN) if path]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory whose latest checkpoint `checkpoint` is, or None for a checkpoint outside a run."""
    if any(checkpoint.parts[-2:] == name.parts for name in CHECKPOINTS_IN_RUN):
        return checkpoint.parent.parent
    return None
