"""The training task owns what a step needs of the model and objective: an objective defined here, with its own
after-step hook and metric, trains through the unedited engine; CLIP's and SigLIP's logit-scale clamp still holds."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from accumulation_helpers import TEXT, TOWERS, make_batch, tiny_task, train_steps
from slip.losses import CLIPLoss, Objective
from slip.models.heads import MAX_LOGIT_SCALE
from slip.app.run_layout import LOG_FILE
from slip.app.task import TrainTask

BOUND = 0.25  # where ShiftedCLIP's hook keeps its shift
PUSH = 10.0  # d loss / d shift = -PUSH: every SGD step moves the shift up by lr x PUSH


class ShiftedCLIP(Objective):
    """CLIP's loss minus PUSH x a learned shift, which its own hook keeps at or below BOUND after each optimizer
    step; the hook also counts its calls in a buffer. `shift_now` (the shift this forward used) is its metric."""

    inputs = ("image", "text")
    metrics = ("shift_now",)

    def __init__(self) -> None:
        super().__init__()
        self.clip = CLIPLoss()
        self.shift = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("hook_calls", torch.tensor(0))

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """CLIP's result, its loss lowered by PUSH x shift, and the shift as a metric."""
        result = self.clip(outputs)
        return {**result, "loss": result["loss"] - PUSH * self.shift, "shift_now": self.shift.detach().clone()}

    def after_optimizer_step(self) -> None:
        """Count the call and clamp the shift."""
        self.hook_calls += 1
        self.shift.clamp_(max=BOUND)


def shifted_task() -> TrainTask:
    """A seeded tiny ViT with a text tower, and ShiftedCLIP, in float64."""
    torch.manual_seed(0)
    builder, sizes = TOWERS["vit"]
    objective = ShiftedCLIP()
    return TrainTask(builder(**sizes, **TEXT, inputs=objective.inputs), objective).double()


@pytest.mark.parametrize("update_freq, accumulation", [(1, "exact"), (2, "exact"), (2, "independent")])
def test_an_objective_of_the_test_trains_through_the_engine_with_its_hook_once_per_step_and_its_metric_logged(
        update_freq: int, accumulation: str, tmp_path: Path) -> None:
    steps, lr = 3, 0.1
    task = shifted_task()
    batches = [make_batch(task, 4, seed=index) for index in range(steps * update_freq)]
    trainer = train_steps(task, batches, tmp_path, steps=steps, lr=lr, precision="fp64", update_freq=update_freq,
                          accumulation=accumulation)
    assert int(task.objective.hook_calls) == steps  # once per optimizer step, not per micro-batch
    # Step 1 moves the shift from 0 to lr x PUSH = 1, above the bound: the hook brings it back, every step.
    assert lr * PUSH > BOUND and float(task.objective.shift.detach()) == BOUND
    assert [row["shift_now"] for row in trainer.history] == [0.0, BOUND, BOUND]
    shown = [line for line in (tmp_path / LOG_FILE).read_text().splitlines() if re.search(r" step \d+/3 ", line)]
    assert len(shown) == steps and all(" shift_now " in line for line in shown)
    assert trainer.state_dict()["objective"]["hook_calls"] == steps  # its state is checkpointed with it


def test_a_skipped_step_runs_no_hook(tmp_path: Path) -> None:
    task = shifted_task()
    batches = [make_batch(task, 4, seed=index) for index in range(3)]
    batches[1]["image"] = torch.full_like(batches[1]["image"], math.nan)
    train_steps(task, batches, tmp_path, steps=3, precision="fp64")
    assert int(task.objective.hook_calls) == 2


@pytest.mark.parametrize("objective", ["clip", "siglip", "slip"])
def test_the_logit_scale_stays_at_most_log_100_when_the_gradient_pushes_it_above(objective: str,
                                                                                   tmp_path: Path) -> None:
    task = tiny_task("vit", objective)
    start = math.log(MAX_LOGIT_SCALE) - 0.01  # below the bound, where its gradient is not clamped away
    with torch.no_grad():
        task.model.logit_scale.fill_(start)
    batch = make_batch(task, 4)
    task(batch)["loss"].backward()
    gradient = float(task.model.logit_scale.grad)
    task.zero_grad(set_to_none=True)
    lr = 1.0 / abs(gradient)  # one SGD step up moves it by 1, far past the bound
    optimizer = torch.optim.SGD(task.parameters(), lr=lr, maximize=gradient > 0)
    train_steps(task, [batch], tmp_path, optimizer=optimizer, lr=lr, precision="fp64")
    assert gradient != 0 and float(task.model.logit_scale.detach()) == math.log(100)


def test_the_task_shows_the_objectives_metrics_and_draws_the_image_inputs_it_uses() -> None:
    clip, slip = tiny_task("vit", "clip"), tiny_task("vit", "slip")
    assert clip.console_metrics() == ("loss", "clip_acc")
    assert slip.console_metrics() == ("loss", "clip_acc", "ssl_acc")
    assert slip.inputs == ("image", "text", "aug1", "aug2")
    batch = make_batch(slip, 3)
    side = batch["image"].shape[-1]
    (grid,) = slip.previews(batch).values()
    assert grid.shape[-2] == 3 * (side + 2) + 2  # make_grid's rows, 2-pixel padding: image, aug1, aug2
    (grid,) = clip.previews({**batch, "aug1": batch["image"]}).values()  # CLIP draws no SSL view
    assert grid.shape[-2] == side + 2 + 2
