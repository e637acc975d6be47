"""The SigLIP preset starts where SigLIP does: logit scale log 10, bias -10."""
from __future__ import annotations

import math

import pytest
import torch

from slip.config import build
from train_helpers import CONF_DIR, compose_config

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                     for p in (CONF_DIR / "experiment").rglob("*.yaml"))
# Zhai et al. 2023: t' = log 10 (the scale exp(t') starts at 10) and b = -10.
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(10), -10.0


def assert_siglip_start(overrides: list[str]) -> None:
    """The composed config, and the objective and model built from it, start at SigLIP's scale and bias."""
    cfg = compose_config(*overrides, "loss=siglip")
    assert cfg.loss._target_ == "slip.losses.SigLIPLoss"
    assert cfg.model.logit_scale_init == SIGLIP_LOGIT_SCALE and cfg.loss.init_logit_bias == SIGLIP_LOGIT_BIAS
    objective = build(cfg.loss, "loss")
    assert objective.logit_bias.item() == SIGLIP_LOGIT_BIAS
    with torch.device("meta"):  # structure only: the arch record says what the builder was given
        model = build(cfg.model, "model", inputs=list(objective.inputs))
    assert model.arch["logit_scale_init"] == SIGLIP_LOGIT_SCALE


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_starts_at_siglips_scale_and_bias(model: str) -> None:
    assert_siglip_start([f"model={model}", "run_name=x"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_starts_at_siglips_scale_and_bias(experiment: str) -> None:
    assert_siglip_start([f"experiment={experiment}", "run_name=x"])


def test_the_scale_parameter_starts_at_ten_and_other_objectives_keep_clips() -> None:
    cfg = compose_config("model=tiny", "loss=siglip")
    model = build(cfg.model, "model", inputs=["image", "text"])
    assert model.logit_scale.item() == torch.tensor(SIGLIP_LOGIT_SCALE).item()
    assert math.exp(cfg.model.logit_scale_init) == pytest.approx(10.0, rel=1e-15, abs=0)
    for loss in ("clip", "slip"):
        clip_model = build(compose_config("model=tiny", f"loss={loss}").model, "model", inputs=["image", "text"])
        assert clip_model.logit_scale.item() == torch.tensor(math.log(1 / 0.07)).item()
