"""The SigLIP preset starts where SigLIP does (logit scale log 10, bias -10), and training logs the learned bias."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from slip.checkpoint import read_checkpoint
from slip.app.config import build
from slip.pretrained import load_pretrained_with_info
from slip.app.train import train
from train_helpers import CONF_DIR, FAST, compose_config

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
    with torch.device("meta"):  # structure only: the spec says what the builder was given
        model = build(cfg.model, "model", inputs=list(objective.inputs))
    assert model.spec.head.logit_scale_init == SIGLIP_LOGIT_SCALE


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


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-step SigLIP run of the tiny model: its directory and results."""
    root = tmp_path_factory.mktemp("siglip")
    return root, train(compose_config(*FAST, "loss=siglip", "trainer.max_steps=2"), root)


def test_the_bias_is_logged_with_the_scale(siglip_run: tuple[Path, dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, results = siglip_run
    history = results["history"]
    assert [entry["step"] for entry in history] == [1, 2]
    assert all("logit_bias" in entry and "logit_scale" in entry for entry in history)
    assert history[0]["logit_bias"] == SIGLIP_LOGIT_BIAS  # the bias step 1's loss used: the initial one
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = events.Scalars("train/logit_bias")
    assert [event.step for event in logged] == [1, 2]
    assert [event.value for event in logged] == [torch.tensor(entry["logit_bias"]).item() for entry in history]


def test_a_training_checkpoint_reports_its_learned_bias_exactly(siglip_run: tuple[Path, dict]) -> None:
    run_dir, _ = siglip_run
    checkpoint = run_dir / "checkpoints" / "last.pt"
    saved = read_checkpoint(checkpoint)["objective"]["logit_bias"]
    assert saved.item() != SIGLIP_LOGIT_BIAS  # two steps moved it
    _, info = load_pretrained_with_info(checkpoint)
    assert info.objective == "SigLIPLoss"
    assert torch.equal(torch.tensor(info.logit_bias, dtype=saved.dtype), saved)
