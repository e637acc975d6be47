"""Shared by the training and config tests: compose the training config as the command line would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import slip
from accumulation_helpers import relative_errors, worst
from slip.checkpoint import read_checkpoint
from slip.app.run_layout import CHECKPOINT_IN_RUN

REPO_ROOT = Path(slip.__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m slip.train` subprocesses: import this checkout's slip, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **extra}
# Few, small steps: the tiny model on a handful of synthetic samples, no workers, no validation.
FAST = ["experiment=debug", "data.batch_size=8", "data.source.num_samples=64", "val=none",
        "trainer.log_every=1", "trainer.log_images=false", "run_name=test"]
# The tiny ViT made smaller still (16 px, 2 + 2 layers), for tests that train many steps.
SMALL_VIT = ["model.image_size=16", "model.vision_layers=2", "model.text_layers=2"]
# Runs whose equalities are checked in float64 (trainer.precision=fp64): 6 steps of SLIP cross an epoch boundary.
EXACT_RUN = [*FAST, *SMALL_VIT, "loss=slip", "data.source.num_samples=32", "trainer.max_steps=6",
             "trainer.save_every=0", "trainer.precision=fp64"]
# In float64 losses agree to rounding (1e-15). A parameter whose gradient is zero in exact arithmetic (attention
# key biases; a bias whose shift a BatchNorm removes) gets float64 noise that AdamW divides by its eps: weights
# agree to 1e-6 of their (floored) norm. A difference in data, schedule or random draws moves them by O(1).
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-10, 1e-6
# CLIP's ModifiedResNet at a CPU-test size (BatchNorm in every stage), with small text tower and heads.
TINY_RESNET = ["model=rn50", "model.image_size=32", *(f"++model.{key}" for key in (
    "vision_layers=[1,1,1,1]", "vision_width=8", "embed_dim=32", "text_width=32", "text_layers=1", "text_heads=2",
    "context_length=32", "ssl_mlp_dim=64", "ssl_embed_dim=32"))]


def compose_config(*overrides: str) -> DictConfig:
    """The training config as `python -m slip.train <overrides>` composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def losses_by_step(results: dict) -> dict[int, float]:
    """{step: loss} of a run's results (its history)."""
    return {int(row["step"]): row["loss"] for row in results["history"]}


def weights_of(run_dir: Path) -> dict:
    """The model weights of a run directory's checkpoint."""
    return read_checkpoint(run_dir / CHECKPOINT_IN_RUN)["model"]


def assert_same_run(losses: dict[int, float], weights: dict, want_losses: dict[int, float], want_weights: dict) -> None:
    """Two float64 runs agree: every step's loss to LOSS_TOLERANCE and every weight to WEIGHT_TOLERANCE."""
    assert sorted(losses) == sorted(want_losses) and want_losses
    for step, loss in want_losses.items():
        assert losses[step] == pytest.approx(loss, rel=LOSS_TOLERANCE, abs=0), f"step {step}"
    name, error = worst(relative_errors(weights, want_weights))
    assert error < WEIGHT_TOLERANCE, f"{name}: {error:.2e}"


def run_eval_cli(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """What `python -m slip.eval ARGS` run in `cwd` exits with and prints, from its entry point (the Hydra app
    `slip.eval.__main__.main`) called in this process: the command itself runs in a subprocess in
    test_multilabel.py and test_train.py (SIGTERM during feature extraction)."""
    from slip.eval.__main__ import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["slip.eval", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out, err)
