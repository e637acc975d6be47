"""SIGTERM (SLURM preemption, a job time limit): a flag the training loop polls, and an interruptible block."""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

__all__ = ["EvaluationInterrupted", "PreemptionFlag"]


class PreemptionFlag:
    """Set by SIGTERM (SLURM preemption); the loop saves and returns at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "PreemptionFlag":
        with contextlib.suppress(ValueError):  # signal handlers only install in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @contextlib.contextmanager
    def interrupting(self, error: type[BaseException]) -> Iterator[None]:
        """Inside the block SIGTERM also raises `error` at once (long loops that do not check the flag, such as
        validation); raised on entry when SIGTERM already came."""
        if self.requested:
            raise error()

        def handle(signum: int, frame: Any) -> None:
            self.requested = True
            raise error()

        try:
            previous = signal.signal(signal.SIGTERM, handle)
        except ValueError:  # not the main thread: the flag alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


class EvaluationInterrupted(Exception):
    """SIGTERM arrived during validation."""
