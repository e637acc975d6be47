"""Exceptions rendered for the project's one-line error messages."""
from __future__ import annotations

__all__ = ["first_line", "last_line", "named_one_line", "one_line"]


def first_line(error: BaseException) -> str:
    """The first line of the error's message (the exception's type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def last_line(error: BaseException) -> str:
    """The last line of the error's message: an error re-raised from a DataLoader worker carries the worker's
    traceback first and its own message last."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The error's whole message with its line breaks and runs of spaces collapsed to single spaces."""
    return " ".join(str(error).split())


def named_one_line(error: BaseException) -> str:
    """"<exception type>: <one_line(error)>"."""
    return f"{type(error).__name__}: {one_line(error)}"
