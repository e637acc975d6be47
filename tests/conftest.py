"""Shared test fixtures: the OpenAI CLIP reference implementation and small deterministic inputs."""
from __future__ import annotations

import importlib
import sys
import types

import pytest


def _import_openai_clip() -> types.ModuleType:
    """Import OpenAI's `clip` package (PyPI: openai-clip), the reference we test against.

    Its `clip.py` does `from pkg_resources import packaging`, and setuptools>=81 no longer ships
    pkg_resources, so we provide just that attribute before importing it.
    """
    if "pkg_resources" not in sys.modules:
        try:
            importlib.import_module("pkg_resources")
        except ImportError:
            import packaging.version

            shim = types.ModuleType("pkg_resources")
            shim.packaging = packaging  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = shim
    return importlib.import_module("clip")


@pytest.fixture(scope="session")
def openai_clip() -> types.ModuleType:
    """OpenAI's reference `clip` module (tokenize, model.build_model, ...)."""
    return _import_openai_clip()


@pytest.fixture(scope="session")
def lightly_loss() -> types.ModuleType:
    """lightly's loss package, the reference of the self-supervised terms (imported once: it takes seconds)."""
    return pytest.importorskip("lightly.loss")


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: on a busy 2-core machine a second one only spins and waits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
