"""What a run's results.json says of any training run, whichever task it trained, and writing run files."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from slip.app.engine import Trainer
from slip.checkpoint import atomic_write
from slip.error_text import last_line

__all__ = ["run_record", "write_text"]


def run_record(trainer: Trainer, started: float, overrides: list[str] | None,
               error: BaseException | None = None) -> dict[str, Any]:
    """Where the run stands (step, checkpoint step, skipped samples, wall time since `started`), the command line's
    overrides, its history, and the error that stopped it, if one did."""
    state = trainer.state
    record: dict[str, Any] = {
        "step": state.step,
        "total_steps": trainer.total_steps,
        "finished": state.step >= trainer.total_steps,
        "checkpoint_step": trainer.saved_step,  # the step checkpoints/last.pt holds
        "skipped_samples": state.skipped,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "overrides": list(overrides or []),
        "history": trainer.history,
    }
    if error is not None:
        record["error"] = last_line(error)
    return record


def write_text(path: Path, text: str) -> None:
    """Replace `path` (its folder made if need be) with `text`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(text.encode()))
