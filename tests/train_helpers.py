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
# CLIP's ModifiedResNet at a CPU-test size (BatchNorm in every stage), with small text tower and heads.
TINY_RESNET = ["model=rn50", "model.image_size=32", *(f"++model.{key}" for key in (
    "vision_layers=[1,1,1,1]", "vision_width=8", "embed_dim=32", "text_width=32", "text_layers=1", "text_heads=2",
    "context_length=32", "ssl_mlp_dim=64", "ssl_embed_dim=32"))]


def compose_config(*overrides: str) -> DictConfig:
    """The training config as `python -m slip.train <overrides>` composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))
