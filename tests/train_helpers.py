"""Shared by the training and config tests: compose the training config as the command line would."""
from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import slip

REPO_ROOT = Path(slip.__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m slip.train` subprocesses: import this checkout's slip, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **extra}
# Few, small steps: the tiny model on a handful of synthetic samples, no workers, no validation.
FAST = ["experiment=debug", "data.batch_size=8", "data.source.num_samples=64", "val=none",
        "trainer.log_every=1", "trainer.log_images=false", "run_name=test"]


def compose_config(*overrides: str) -> DictConfig:
    """The training config as `python -m slip.train <overrides>` composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))
