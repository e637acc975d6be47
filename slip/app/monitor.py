"""Training telemetry: TensorBoard scalars and images, a console progress bar (TTY) or periodic lines, and the
same lines, timestamped, in the run's train.log."""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO

import torch

from slip.app.run_layout import LOG_FILE


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Monitor:
    """Writes what the engine measures; everything is a no-op on ranks other than the main one."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        log_every: int,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.log_every = max(log_every, 1)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.writer = None
        self.log_path = run_dir / LOG_FILE
        self._start_time = time.perf_counter()
        self._start_step: int | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and only rank 0 needs it

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train/") -> None:
        """Log scalar values to TensorBoard."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)

    def images(self, tag: str, grid: torch.Tensor, step: int = 0) -> None:
        """Log a [3, H, W] image grid with values in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def _log(self, line: str) -> None:
        """Append `line` to train.log (opened per line: lines are few, and a crash loses none)."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{datetime.now().isoformat(sep=' ', timespec='seconds')} {line}\n")

    def message(self, text: str) -> None:
        """A line for the user (ends any progress bar line first), also written to train.log."""
        if self.enabled:
            if self.interactive:
                self.stream.write("\n")
            print(text, file=self.stream, flush=True)
            self._log(text)

    def begin(self, step: int) -> None:
        """Start the ETA clock at optimizer step `step` (the step a fresh or resumed run starts from)."""
        self._start_step, self._start_time = step, time.perf_counter()

    def progress(self, step: int, values: Mapping[str, float]) -> None:
        """Progress with ETA: redrawn in place on a TTY, else one line every `log_every` steps."""
        if not self.enabled:
            return
        if self._start_step is None:
            self.begin(step - 1)
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        shown = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        line = f"step {step}/{self.total_steps} [{100 * step / self.total_steps:3.0f}%] {shown} ETA {_format_seconds(eta)}"
        periodic = step % self.log_every == 0 or step == self.total_steps
        if self.interactive:
            self.stream.write("\r" + line[:200].ljust(120))
            self.stream.flush()
        elif periodic:
            print(line, file=self.stream, flush=True)
        if periodic:
            self._log(line)

    def close(self) -> None:
        """Flush TensorBoard and end the progress line."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def view_grid(views: Sequence[torch.Tensor], mean: Iterable[float], std: Iterable[float],
              count: int = 8) -> torch.Tensor:
    """One row per image batch of `views` (its first `count` samples), un-normalised to [0, 1] for TensorBoard;
    smaller views (global crops of their own size) padded with black at the bottom and right to the largest."""
    from torchvision.utils import make_grid

    mean_t = torch.tensor(list(mean)).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std)).view(1, 3, 1, 1)
    rows = [(images[:count].float().cpu() * std_t + mean_t).clamp(0, 1) for images in views]
    height, width = max(row.shape[-2] for row in rows), max(row.shape[-1] for row in rows)
    rows = [torch.nn.functional.pad(row, (0, width - row.shape[-1], 0, height - row.shape[-2])) for row in rows]
    return make_grid(torch.cat(rows), nrow=min(count, rows[0].shape[0]))
