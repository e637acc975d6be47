"""BatchNorm's running statistics under gradient checkpointing and exact accumulation, in float64.

Checkpointing recomputes a ModifiedResNet stage in backward, and exact accumulation encodes every micro-batch
twice; neither may move the running statistics more than the plain computation does: once per forward of each
micro-batch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from accumulation_helpers import make_batch, parameters, split, tiny_task, train_steps
from slip.app.task import TrainTask
from slip.models.vision import Bottleneck, ModifiedResNet, checkpoint_keeping_buffers

MICRO = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm inside `module`."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same names and, per name, the same values (integers exactly, floats to float64 rounding)."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        if expected.is_floating_point():
            torch.testing.assert_close(got[name], expected, rtol=1e-12, atol=1e-14, msg=name)
        else:
            assert torch.equal(got[name], expected), f"{name}: {got[name]} != {expected}"


def resnet_step(checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Buffers and gradients of one training-mode forward and backward of a seeded tiny ModifiedResNet."""
    torch.manual_seed(0)
    tower = ModifiedResNet(layers=(2, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)
    tower = tower.double().train()
    tower.set_grad_checkpointing(checkpointing)
    images = torch.randn(MICRO, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tower(images).square().sum().backward()
    buffers = {name: value.clone() for name, value in tower.named_buffers()}
    return buffers, {name: p.grad.clone() for name, p in tower.named_parameters()}


def test_a_checkpointed_resnet_in_training_moves_batchnorm_statistics_once() -> None:
    plain_buffers, plain_grads = resnet_step(checkpointing=False)
    buffers, grads = resnet_step(checkpointing=True)
    counts = {name: int(value) for name, value in buffers.items() if name.endswith("num_batches_tracked")}
    # The stem's 3 BatchNorms, 3 in each of the 5 blocks, and one in each stage's downsampling branch.
    assert len(counts) == 3 + 5 * 3 + 4 and set(counts.values()) == {1}, counts
    assert_same_tensors(buffers, plain_buffers)
    assert_same_tensors(grads, plain_grads)


class CheckpointedStage(nn.Module):
    """One bottleneck run through `checkpoint_keeping_buffers`, as ModifiedResNet runs its stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(Bottleneck(8, 4, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output, checkpointed."""
        return checkpoint_keeping_buffers(self.stage, x)


def test_a_compiled_checkpointed_stage_moves_batchnorm_statistics_once() -> None:
    # torch.compile refuses the eager recomputation context; its own graph must update the buffers once.
    torch.manual_seed(0)
    compiled = CheckpointedStage().double().train()
    plain = CheckpointedStage().double().train()
    plain.load_state_dict(compiled.state_dict())
    x = torch.randn(MICRO, 8, 8, 8, dtype=torch.float64)
    torch.compile(compiled, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    plain.stage(x).square().sum().backward()
    assert int(compiled.stage[0].bn1.num_batches_tracked) == 1
    assert_same_tensors(dict(compiled.named_buffers()), dict(plain.named_buffers()))
    assert_same_tensors({n: p.grad for n, p in compiled.named_parameters()},
                        {n: p.grad for n, p in plain.named_parameters()})


def image_views(task: TrainTask) -> int:
    """How many image views the task's objective sends through the image tower."""
    return sum(key != "text" for key in task.objective.inputs)


def trained(objective: str, checkpointing: bool, batches: list[dict], tmp_path: Path, steps: int,
            **settings) -> TrainTask:
    """A seeded tiny ResNet task for `objective`, trained `steps` steps on `batches`, checkpointed or not."""
    task = tiny_task("resnet", objective).train()
    task.model.set_grad_checkpointing(checkpointing)  # what trainer.grad_checkpointing does
    train_steps(task, batches, tmp_path / f"checkpointing-{checkpointing}", steps=steps, **settings)
    return task


@pytest.mark.parametrize("objective", ["clip", "slip"])
def test_checkpointed_training_steps_equal_plain_ones_in_weights_and_batchnorm_statistics(
        objective: str, tmp_path: Path) -> None:
    steps = 3
    batches = split(make_batch(tiny_task("resnet", objective), MICRO * steps), steps)
    plain, checkpointed = (trained(objective, checkpointing, batches, tmp_path, steps)
                           for checkpointing in (False, True))
    for task in (plain, checkpointed):
        counts = {int(bn.num_batches_tracked) for bn in batchnorms(task.model.visual)}
        assert counts == {steps * image_views(task)}
    assert_same_tensors(parameters(checkpointed), parameters(plain))


@pytest.mark.parametrize("update_freq", [2, 3])
def test_exact_accumulation_moves_batchnorm_statistics_once_per_micro_batch_checkpointed_or_not(
        update_freq: int, tmp_path: Path) -> None:
    # SLIP: three image views through the ResNet tower; the SSL head's BatchNorm runs on the cached features
    # of the whole window, once per step for each of the two SSL views.
    steps = 2
    batches = split(make_batch(tiny_task("resnet", "slip"), MICRO * update_freq * steps), update_freq * steps)
    plain, checkpointed = (trained("slip", checkpointing, batches, tmp_path, steps, update_freq=update_freq,
                                   accumulation="exact")
                           for checkpointing in (False, True))
    for task in (plain, checkpointed):
        tower_counts = {int(bn.num_batches_tracked) for bn in batchnorms(task.model.visual)}
        assert tower_counts == {steps * update_freq * image_views(task)}
        assert {int(bn.num_batches_tracked) for bn in batchnorms(task.model.image_mlp)} == {steps * 2}
    assert_same_tensors(parameters(checkpointed), parameters(plain))
