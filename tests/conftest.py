"""Shared test fixtures: the OpenAI CLIP reference implementation and small deterministic inputs."""
from __future__ import annotations

import importlib
import os
import sys
import types

import pytest
import torch

# Tiny models on one CPU thread, in this process and in every process a test starts (python -m slip.train, torchrun,
# spawned ranks and loader workers inherit the variable): on a busy 2-core machine a second thread only spins and
# waits, and test_linear_probe.py already leaves the rest of the suite on one thread. OMP_NUM_THREADS set outside
# the tests wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="session")
def exact_run_at_batch_8(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], dict]:
    """train_helpers.EXACT_RUN at data.batch_size=8 on one process, trained once per session: its {step: loss} and
    final model weights, which test_run_identity.py and test_train.py compare other layouts of the run with (read
    them, never change them)."""
    from slip.app.train import train
    from train_helpers import EXACT_RUN, compose_config, losses_by_step, weights_of

    run_dir = tmp_path_factory.mktemp("exact_run_at_batch_8")
    results = train(compose_config(*EXACT_RUN, "data.batch_size=8"), run_dir)
    return losses_by_step(results), weights_of(run_dir)
