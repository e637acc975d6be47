"""The momentum teacher: its EMA and schedule, its place in the training task, exact accumulation (one teacher pass
and one update per step), checkpoint and resume, all in float64."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from accumulation_helpers import TEXT, TOWERS, make_batch, parameters, relative_errors, split, train_steps, worst
from slip.app.config import ConfigError, build
from slip.app.task import TeacherSettings, TrainTask
from slip.app.train import train
from slip.checkpoint import read_checkpoint
from slip.dino import DINOLoss
from slip.losses import CLIPLoss, ComposedObjective, Term
from slip.momentum_losses import BYOLLoss, MoCoV3Loss
from slip.teacher import MomentumTeacher, teacher_key, teacher_momentum
from train_helpers import CHECKPOINT_IN_RUN, FAST, SMALL_VIT, compose_config, losses_by_step

MICRO, K, STEPS = 8, 4, 2
EXACT = 1e-10
OBJECTIVES = {"byol": lambda: BYOLLoss(hidden_dim=24), "mocov3": lambda: MoCoV3Loss(hidden_dim=24),
              "clip+byol": lambda: ComposedObjective({"clip": Term(CLIPLoss()), "byol": Term(BYOLLoss(hidden_dim=24))}),
              "dino": lambda: DINOLoss(out_dim=32, local_crops=2)}


def teacher_task(objective: str, momentum: float = 0.9, total_steps: int = STEPS) -> TrainTask:
    """A seeded tiny ViT with `objective` (its predictor bound to the model) and a momentum teacher, in float64."""
    torch.manual_seed(0)
    built = OBJECTIVES[objective]()
    builder, sizes = TOWERS["vit"]
    model = builder(**sizes, **TEXT, inputs=built.inputs)
    built.bind(model.spec)
    teacher = MomentumTeacher(model, built.teacher_views, momentum, total_steps)
    return TrainTask(model, built, teacher=teacher).to(torch.float64)


def test_the_cosine_schedule_runs_from_the_start_momentum_to_one() -> None:
    assert teacher_momentum(0.996, 0, 100) == 0.996
    assert teacher_momentum(0.996, 50, 100) == pytest.approx(0.998, abs=1e-15)
    assert teacher_momentum(0.996, 100, 100) == 1.0
    assert teacher_momentum(0.99, 30, 100, "constant") == 0.99


@pytest.mark.parametrize("settings, message", [
    (dict(momentum=1.5, schedule="cosine", always=False), r"^momentum must be a number in \[0, 1\], got 1\.5$"),
    (dict(momentum=0.99, schedule="linear", always=False), r"^schedule must be one of \['cosine', 'constant'\], got 'linear'$"),
])
def test_bad_teacher_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TeacherSettings(**settings)
    with pytest.raises(ConfigError, match="^teacher." + next(iter(k for k in settings if k in message))):
        build(compose_config(*(f"teacher.{key}={value}" for key, value in settings.items())).teacher, "teacher")


def test_an_update_moves_every_float_tensor_by_the_momentum_and_copies_the_integers() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    teacher = MomentumTeacher(student, ("aug1",), momentum=0.9, total_steps=4)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    student(torch.randn(5, 3, dtype=torch.float64))  # BatchNorm's running statistics and batch count move
    teacher.update(student)
    for key, value in student.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(teacher.model.state_dict()[key], 0.9 * before[key] + 0.1 * value,
                                       rtol=1e-15, atol=1e-15)
        else:
            assert torch.equal(teacher.model.state_dict()[key], value)
    assert int(teacher.updates) == 1
    assert teacher.current_momentum() == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-15)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training


def test_the_task_hands_the_teacher_outputs_to_the_objective_without_autograd() -> None:
    task = teacher_task("byol")
    batch = make_batch(task, 4)
    taught = task.teacher_outputs(batch)
    assert set(taught) == {teacher_key("aug1_embed"), teacher_key("aug2_embed")}
    assert not any(value.requires_grad for value in taught.values())
    torch.testing.assert_close(taught[teacher_key("aug1_embed")], task.model.eval()({"aug1": batch["aug1"]})["aug1_embed"])
    with pytest.raises(ValueError, match=r"needs a momentum teacher for \['aug1', 'aug2'\]"):
        TrainTask(task.model, task.objective)
    kept_to_evaluate = TrainTask(task.model, CLIPLoss(), teacher=MomentumTeacher(task.model, ()))
    assert kept_to_evaluate.teacher_outputs(batch) == {}


def run_steps(objective: str, batches: list[dict], update_freq: int, run_dir: Path) -> dict[str, torch.Tensor]:
    task = teacher_task(objective)
    train_steps(task, batches, run_dir, steps=STEPS, update_freq=update_freq, accumulation="exact", precision="fp64")
    return parameters(task)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_exact_accumulation_with_a_teacher_equals_one_step_on_the_whole_batch(objective: str, tmp_path: Path) -> None:
    """update_freq=4 at batch 8 against batch 32, two steps: every weight of model, objective (the predictor and
    its BatchNorm statistics; DINO's centre, teacher prototypes and step count) and teacher agree, and the teacher
    was updated once per step."""
    task = teacher_task(objective)
    whole = [make_batch(task, MICRO * K, seed=step) for step in range(STEPS)]
    big = run_steps(objective, whole, 1, tmp_path / "big")
    exact = run_steps(objective, [part for batch in whole for part in split(batch, K)], K, tmp_path / "exact")
    name, error = worst(relative_errors(exact, big))
    assert error <= EXACT, f"{name}: {error:.2e}"
    assert int(exact["teacher.updates"]) == int(big["teacher.updates"]) == STEPS
    student = {key.removeprefix("model."): value for key, value in exact.items() if key.startswith("model.visual")}
    lagging = {key.removeprefix("teacher.model."): value for key, value in exact.items()
               if key.startswith("teacher.model.visual")}
    assert student.keys() == lagging.keys() and any(not torch.equal(lagging[k], v) for k, v in student.items())


SMALLER = {"clip_byol": ["loss.terms.byol.objective.hidden_dim=32"], "mocov3": ["loss.hidden_dim=32"],
           "dino": ["loss.out_dim=64", "loss.local_crops=2", "augment.local_crop_size=8"]}


@pytest.mark.parametrize("loss", list(SMALLER))
def test_resume_with_a_teacher_is_exact(loss: str, tmp_path: Path) -> None:
    """Stopped after 2 of 4 steps and resumed: the same losses, and bit-identical model, objective (DINO's centre
    among it) and teacher."""
    overrides = [*FAST, *SMALL_VIT, f"loss={loss}", "data.source.num_samples=32", "trainer.max_steps=4",
                 "trainer.save_every=0", "trainer.precision=fp64", *SMALLER[loss]]
    full = train(compose_config(*overrides), tmp_path / "full")
    train(compose_config(*overrides, "trainer.stop_after=2"), tmp_path / "split")
    resumed = train(compose_config(*overrides), tmp_path / "split")
    assert resumed["finished"] and losses_by_step(resumed) == losses_by_step(full)
    want = read_checkpoint(tmp_path / "full" / CHECKPOINT_IN_RUN)
    got = read_checkpoint(tmp_path / "split" / CHECKPOINT_IN_RUN)
    for part in ("model", "objective", "teacher"):
        assert want[part].keys() == got[part].keys()
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key}"
    assert int(got["teacher"]["updates"]) == 4


def test_a_changed_teacher_momentum_does_not_resume_the_run(tmp_path: Path) -> None:
    overrides = [*FAST, *SMALL_VIT, "loss=byol", "trainer.max_steps=2", "loss.hidden_dim=32"]
    train(compose_config(*overrides, "trainer.stop_after=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"^teacher\.momentum: differs"):
        train(compose_config(*overrides, "teacher.momentum=0.9"), tmp_path)


def test_an_ema_kept_for_any_objective_is_what_eval_reads_with_weights_ema(tmp_path: Path) -> None:
    """teacher.always keeps the EMA for plain CLIP; load_pretrained(weights="ema") and slip.eval weights=ema read it,
    and its results go to eval-ema under their own fingerprint, never in the model's place."""
    from slip.app.evaluate import evaluate
    from slip.pretrained import load_pretrained
    from test_eval import SMALL, eval_config

    run = tmp_path / "run"
    results = train(compose_config(*FAST, *SMALL_VIT, "loss=clip", "trainer.max_steps=3", "teacher.always=true",
                                   "teacher.momentum=0.5"), run)
    assert results["finished"]
    checkpoint = read_checkpoint(run / CHECKPOINT_IN_RUN)
    assert int(checkpoint["teacher"]["updates"]) == 3
    student, ema = load_pretrained(run / CHECKPOINT_IN_RUN), load_pretrained(run / CHECKPOINT_IN_RUN, weights="ema")
    for key, value in ema.state_dict().items():
        assert torch.equal(value, checkpoint["teacher"][f"model.{key}"]), key
    assert any(not torch.equal(value, student.state_dict()[key]) for key, value in ema.state_dict().items())
    written = evaluate(eval_config(f"checkpoint={run}", "weights=ema", "tasks.linear_probe=[]", "tasks.knn=[]",
                                   "tasks.retrieval=[]", *SMALL))
    path = written[run / CHECKPOINT_IN_RUN]["zeroshot"]
    assert path.parent == run / "eval-ema"
    stored = json.loads(path.read_text())
    assert stored["weights"] == "ema" and stored["fingerprint"].endswith("+ema")
    assert all(record["weights"] == "ema" for record in stored["records"])


def test_weights_ema_of_a_checkpoint_without_a_teacher_is_refused_in_one_line(tmp_path: Path) -> None:
    from slip.checkpoint import CheckpointError
    from slip.pretrained import load_pretrained

    train(compose_config(*FAST, *SMALL_VIT, "loss=clip", "trainer.max_steps=1"), tmp_path)
    with pytest.raises(CheckpointError, match=r"holds no EMA weights \(its run kept no momentum teacher"):
        load_pretrained(tmp_path / CHECKPOINT_IN_RUN, weights="ema")
    with pytest.raises(ValueError, match=r"^weights must be one of \['model', 'ema'\], got 'teacher'$"):
        load_pretrained(tmp_path / CHECKPOINT_IN_RUN, weights="teacher")


# ---------------------------------------------------------------- two gloo processes

WORLD = 2
DISTRIBUTED = ("byol", "mocov3", "dino")
STRATEGIES = ("ddp", "fsdp")  # fsdp: the teacher sharded like the model, its EMA taken shard by shard


def _rank_worker(rank: int, port: int) -> dict:
    """One rank: its half of each step's global batch, as K micro-batches, through the engine for two steps."""
    import tempfile

    from rank_helpers import gloo_world
    from slip.distributed import convert_sync_batchnorm, make_gather

    from slip.sharded_checkpoint import as_full_tensor

    with gloo_world(rank, port, WORLD) as world:
        results = {}
        for objective, strategy in [(objective, strategy) for objective in DISTRIBUTED for strategy in STRATEGIES]:
            task = teacher_task(objective)
            task.objective.set_gather(make_gather(world))
            for part in (task.model.image_mlp, task.objective):
                convert_sync_batchnorm(part)
            whole = [make_batch(task, MICRO * K * WORLD, seed=step) for step in range(STEPS)]
            mine = [{key: value.chunk(WORLD)[rank] for key, value in batch.items()} for batch in whole]
            with tempfile.TemporaryDirectory() as run_dir:
                train_steps(task, [part for batch in mine for part in split(batch, K)], Path(run_dir), steps=STEPS,
                            update_freq=K, accumulation="exact", precision="fp64", world=world, strategy=strategy)
            results[objective, strategy] = {name: value.detach().clone()
                                            for name, value in as_full_tensor(task.state_dict()).items()}
    return results


def test_two_gloo_ranks_hold_one_teacher_equal_to_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """Two steps of 2 ranks x 4 micro-batches of 8, under DDP and FSDP: model, objective (predictor, DINO's centre)
    and teacher are the same on both ranks and equal one process at batch 64."""
    from rank_helpers import run_ranks

    ranks = run_ranks(_rank_worker, WORLD, tmp_path, timeout=300)
    for objective in DISTRIBUTED:
        task = teacher_task(objective)
        whole = [make_batch(task, MICRO * K * WORLD, seed=step) for step in range(STEPS)]
        want = run_steps(objective, whole, 1, tmp_path / f"single-{objective}")
        for strategy in STRATEGIES:
            got = ranks[0][objective, strategy]
            for key, value in got.items():
                assert torch.equal(ranks[1][objective, strategy][key], value), \
                    f"{objective} {strategy}: {key} differs between the ranks"
            name, error = worst(relative_errors(got, want))
            print(f"{objective} {strategy}: worst relative error {error:.1e} ({name})")
            assert error <= EXACT, f"{objective} {strategy} {name}: {error:.2e}"
