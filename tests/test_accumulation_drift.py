"""Exact accumulation over many steps of `slip.train`, in float64: data order, augmentation draws, epoch boundaries,
the schedule and random states all agree, so only rounding separates update_freq 2 from the whole batch.

In fp32 the same pair drifts apart (about 5e-3 relative in the loss after 20 steps, benchmarks/results/
accumulation_drift.md): rounding noise in gradients that are zero in exact arithmetic (attention key biases, the bias
before the SSL head's BatchNorm) becomes steps of about +-lr under AdamW. In float64 that noise stays far below
AdamW's eps, and the runs agree to rounding.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import (FAST, SMALL_VIT, TINY_RESNET, assert_same_run, compose_config, losses_by_step,
                           weights_of)

from slip.app.config import build
from slip.distributed import WorldInfo
from slip.models.heads import MAX_LOGIT_SCALE
from slip.app.task import TrainTask
from slip.app.train import build_run, train

STEPS = 20
# 32 samples in steps of 8: 4 steps an epoch, so 20 steps cross 4 epoch boundaries and the 1-epoch warm-up.
COMMON = [*FAST, "data.source.num_samples=32", f"trainer.max_steps={STEPS}", "trainer.save_every=0",
          "trainer.precision=fp64"]
WHOLE, MICRO = ["data.batch_size=8"], ["data.batch_size=4", "trainer.update_freq=2"]


@pytest.mark.parametrize("loss", ["slip", "simclr"])
def test_twenty_float64_steps_with_update_freq_2_equal_the_whole_batch_run(loss: str, tmp_path: Path) -> None:
    """A ViT tower: the micro-batches of update_freq 2 make up exactly the whole batch's step, twenty times over."""
    whole = train(compose_config(*COMMON, *SMALL_VIT, f"loss={loss}", *WHOLE), tmp_path / "whole")
    micro = train(compose_config(*COMMON, *SMALL_VIT, f"loss={loss}", *MICRO), tmp_path / "micro")
    assert len(whole["history"]) == STEPS
    assert_same_run(losses_by_step(micro), weights_of(tmp_path / "micro"), losses_by_step(whole),
                    weights_of(tmp_path / "whole"))


def _plain_accumulated_run(overrides: list[str]) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """The reference: the run's own model, objective, data, optimizer and schedule (`slip.train.build_run`), each
    step one autograd graph over all its micro-batches (no cached features, no replays), AdamW stepped by hand."""
    cfg = compose_config(*overrides)
    settings = build(cfg.trainer, "trainer")
    parts = build_run(cfg, WorldInfo(), settings)
    task = TrainTask(parts.model, parts.objective).to(torch.float64).train()
    device = torch.device("cpu")
    losses: list[float] = []
    epoch = 0
    while len(losses) < STEPS:
        batches = iter(parts.data.loader(epoch, 0))
        for _ in range(parts.data.steps_per_epoch):
            if len(losses) == STEPS:
                break
            micro = [parts.transform.to_device(next(batches), device) for _ in range(settings.update_freq)]
            features = [task.model.tower_features({key: value.double() if value.is_floating_point() else value
                                                   for key, value in batch.items() if isinstance(value, torch.Tensor)})
                        for batch in micro]
            result = task.finish({key: torch.cat([part[key] for part in features]) for key in features[0]})
            result["loss"].backward()
            for group in parts.optimizer.param_groups:
                group["lr"] = parts.schedule(len(losses))
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            if task.model.logit_scale is not None:
                with torch.no_grad():
                    task.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            losses.append(float(result["loss"].detach()))
        epoch += 1
    return dict(enumerate(losses, start=1)), task.model.state_dict()


@pytest.mark.parametrize("loss", ["slip", "simclr"])
def test_twenty_float64_steps_of_exact_accumulation_on_a_resnet_equal_one_graph_over_the_micro_batches(
        loss: str, tmp_path: Path) -> None:
    """A ModifiedResNet tower normalises each micro-batch with its own statistics, so update_freq 2 is not the
    whole batch's step; it is one graph over both micro-batches, which the engine's cached features and replays
    must reproduce (BatchNorm's running statistics included), through twenty steps of data, schedule and resume
    positions."""
    overrides = [*COMMON, f"loss={loss}", *TINY_RESNET, *MICRO]
    results = train(compose_config(*overrides), tmp_path)
    want_losses, want_weights = _plain_accumulated_run(overrides)
    assert_same_run(losses_by_step(results), weights_of(tmp_path), want_losses, want_weights)
