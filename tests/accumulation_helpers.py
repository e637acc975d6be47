"""Tiny float64 models, batches and one-call training runs for the accumulation tests (and their 2-rank worker)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slip.distributed import WorldInfo
from slip.app.engine import Trainer, TrainerSettings
from slip.app.task import TrainTask
from slip.losses import CLIPLoss, Objective, SigLIPLoss, SimCLRLoss, SLIPLoss
from slip.models import build_resnet_model, build_vit_model
from slip.ssl_losses import BarlowTwinsLoss, VICRegLoss

OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "clip": CLIPLoss, "simclr": SimCLRLoss, "slip": SLIPLoss, "siglip": SigLIPLoss,
    "vicreg": VICRegLoss, "barlow": BarlowTwinsLoss,  # batch moments over the whole accumulated batch
}
TEXT = dict(embed_dim=16, text_width=32, text_layers=2, text_heads=2, context_length=12, vocab_size=64,
            ssl_mlp_dim=32, ssl_embed_dim=16)
TOWERS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "vit": (build_vit_model, dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2)),
    # Stages of one bottleneck each: BatchNorm throughout the tower, at a CPU-test size.
    "resnet": (build_resnet_model, dict(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=8)),
}
EOT = TEXT["vocab_size"] - 1


def tiny_task(tower: str, objective: str, seed: int = 0, dtype: torch.dtype = torch.float64,
              **model_overrides: Any) -> TrainTask:
    """A seeded tiny model (only the parts `objective` needs) with its objective, in `dtype`."""
    torch.manual_seed(seed)
    built = OBJECTIVES[objective]()
    builder, sizes = TOWERS[tower]
    model = builder(**{**sizes, **TEXT, **model_overrides}, inputs=built.inputs)
    return TrainTask(model, built).to(dtype)


def image_size(task: TrainTask) -> int:
    """The image side the task's model takes."""
    return task.model.spec.preprocess.image_size


def make_batch(task: TrainTask, rows: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """A seeded batch of what the task's objective reads: image views, and captions of varied lengths."""
    generator = torch.Generator().manual_seed(seed)
    side = image_size(task)
    batch: dict[str, Tensor] = {}
    for key in task.objective.inputs:
        if key == "text":
            length = TEXT["context_length"]
            tokens = torch.randint(1, EOT, (rows, length), generator=generator)
            ends = torch.randint(2, length, (rows,), generator=generator)
            positions = torch.arange(length)
            tokens[positions > ends[:, None]] = 0
            tokens[torch.arange(rows), ends] = EOT  # EOT has the largest id; rows end at different positions
            batch[key] = tokens
        else:
            batch[key] = torch.randn(rows, 3, side, side, generator=generator, dtype=dtype)
    return batch


def split(batch: Mapping[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """`batch` cut into `parts` consecutive micro-batches."""
    pieces = {key: value.chunk(parts) for key, value in batch.items()}
    return [{key: chunks[index] for key, chunks in pieces.items()} for index in range(parts)]


def parameters(module: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def gradients(module: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter's gradient (zeros where it has none)."""
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in module.named_parameters()}


def relative_errors(got: Mapping[str, Tensor], want: Mapping[str, Tensor], floor: float = 1e-4) -> dict[str, float]:
    """Per tensor, ||got - want|| / max(||want||, floor x the norm of all of `want`); integers must be equal.

    The floor keeps a tensor whose value is zero in exact arithmetic (rounding noise on both sides, e.g. the
    gradient of a bias whose shift a BatchNorm removes) from reading as a large relative error.
    """
    floats = [value.double().flatten() for value in want.values() if value.is_floating_point()]
    total = float(torch.linalg.vector_norm(torch.cat(floats))) if floats else 0.0
    errors = {}
    for name, expected in want.items():
        if not expected.is_floating_point():
            errors[name] = 0.0 if torch.equal(got[name], expected) else math.inf
            continue
        difference = float(torch.linalg.vector_norm((got[name] - expected).double()))
        scale = max(float(torch.linalg.vector_norm(expected.double())), floor * total)
        errors[name] = difference / scale if scale else (0.0 if difference == 0 else math.inf)
    return errors


def worst(errors: Mapping[str, float]) -> tuple[str, float]:
    """The (name, error) of the largest error."""
    name = max(errors, key=lambda key: errors[key])
    return name, errors[name]


def train_steps(task: TrainTask, batches: Sequence[dict[str, Tensor]], run_dir: Path, *, steps: int = 1,
                optimizer: torch.optim.Optimizer | None = None, lr: float = 0.1, world: WorldInfo = WorldInfo(),
                loader: Callable[[int, int], Iterable[dict]] | None = None,
                prepare_batch: Callable[[Mapping[str, Any], torch.device], dict] | None = None,
                resume: bool = False, **settings: Any) -> Trainer:
    """Train `task` for `steps` optimizer steps on `batches` (one epoch, on the CPU) and return the Trainer;
    with `resume`, continue from the latest checkpoint in `run_dir` (written under either strategy).

    Plain SGD at `lr` by default, so that the weight change of a step is -lr times its gradient.
    """
    optimizer = optimizer or torch.optim.SGD(task.parameters(), lr=lr)
    settings = {"precision": "fp32", "device": "cpu", "save_every": 0, "log_images": False, "log_every": 1,
                **settings}
    trainer = Trainer(task, optimizer, lambda step: lr, TrainerSettings(**settings), world, run_dir,
                      total_steps=steps, steps_per_epoch=steps)
    if resume:
        from slip.app.run_identity import checkpoint_to_resume

        checkpoint, path = checkpoint_to_resume("auto", run_dir)
        trainer.resume(path, checkpoint)
    trainer.fit(loader or (lambda epoch, skip: iter(batches[skip:])),
                **({"prepare_batch": prepare_batch} if prepare_batch is not None else {}))
    return trainer
