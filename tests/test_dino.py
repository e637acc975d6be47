"""DINOLoss (slip.dino): float64 against lightly and against a naive transcription of the DINO authors' loss
(facebookresearch/dino, main_dino.py), the teacher prototypes' EMA, edge cases, accumulation of several forwards
into one centre step, and two gloo ranks against one process on the same global batch.

Where lightly (1.6) differs from the authors' code, in what is tested here:
- it builds its temperatures with the default dtype (`torch.linspace` for the warm-up schedule, `torch.tensor` for
  the teacher temperature), so under the usual float32 default every temperature is rounded to float32, where the
  authors' code keeps numpy float64 (a relative difference of about 1e-8 in the logits). The comparisons here run
  lightly with float64 as the default dtype; the schedule itself is checked exactly against numpy's, as the
  authors build it.
- nothing else: its loss (the [teacher views x student views] cross-entropy matrix with its diagonal zeroed, summed
  and divided by the number of off-diagonal terms times the batch) is the authors' mean over (q, v != q) of
  per-pair batch means, and its centre update (the mean teacher score, all-reduced over ranks) is the authors'.
Like both, the loss of a forward uses the centre from before that forward; where they move the centre within the
forward, DINOLoss moves it in `after_optimizer_step` from every forward since the last step, which is the same for
one forward per step.
"""
from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from slip.dino import DINOLoss
from slip.distributed import make_gather
from slip.inputs import SSL_VIEWS, global_views, local_views
from slip.losses import MissingOutputError
from slip.teacher import teacher_key
from rank_helpers import gloo_world, ranks_fixture

F64 = torch.float64
DIM, OUT_DIM = 16, 32
TEACHER_KEYS = tuple(teacher_key(f"{view}_embed") for view in SSL_VIEWS)
# Temperatures that differ, so that the warm-up changes the loss.
TEMPS = dict(student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04)

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype: lightly's temperatures are built with it (see the module docstring)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def student_keys(local_crops: int) -> tuple[str, ...]:
    return ("aug1_embed", "aug2_embed", *(f"local{k}_embed" for k in range(1, local_crops + 1)))


def make_outputs(batch: int, local_crops: int = 0, seed: int = 0, dim: int = DIM,
                 dtype: torch.dtype = F64) -> dict[str, Tensor]:
    """Correlated random SSL-head outputs: the student's of every crop (leaf tensors requiring grad) and the
    teacher's of the two global crops (close to the student's of the same crop)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=gen, dtype=F64)
    keys = student_keys(local_crops)
    students = {key: base + 0.5 * torch.randn(batch, dim, generator=gen, dtype=F64) for key in keys}
    teachers = {key: students[f"{view}_embed"] + 0.2 * torch.randn(batch, dim, generator=gen, dtype=F64)
                for key, view in zip(TEACHER_KEYS, SSL_VIEWS, strict=True)}
    return {**{k: v.to(dtype).requires_grad_() for k, v in students.items()},
            **{k: v.to(dtype) for k, v in teachers.items()}}


def leaves(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent copies: the student's as leaves requiring grad, the teacher's without grad."""
    return {k: v.detach().clone().requires_grad_(not k.startswith("teacher_")) for k, v in outputs.items()}


def make_dino(local_crops: int = 0, seed: int = 0, dtype: torch.dtype = F64, dim: int = DIM, out_dim: int = OUT_DIM,
              **kwargs) -> DINOLoss:
    """A DINOLoss in `dtype` with seeded prototypes, teacher prototypes that differ from them, and a non-zero
    centre (so that centring shows from the first forward)."""
    objective = DINOLoss(out_dim=out_dim, local_crops=local_crops, dim=dim, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        prototypes = torch.randn(out_dim, dim, generator=gen, dtype=F64)
        objective.prototypes.copy_(prototypes)
        objective.teacher_prototypes.copy_(prototypes + 0.3 * torch.randn(out_dim, dim, generator=gen, dtype=F64))
        objective.center.copy_(0.1 * torch.randn(1, out_dim, generator=gen, dtype=F64))
    return objective


def scores(embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """DINO's last layer with its weight norm's gain fixed to 1, on the L2-normalised embedding."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T


def head_scores(objective: DINOLoss, outputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The teacher's scores of the globals and the student's of every crop (globals first), from the objective's
    own (teacher) prototypes."""
    students = [scores(outputs[f"{view}_embed"], objective.prototypes) for view in objective.inputs]
    teachers = [scores(outputs[key], objective.teacher_prototypes) for key in TEACHER_KEYS]
    return teachers, students


def make_lightly(lightly_loss: types.ModuleType, objective: DINOLoss, warmup_steps: int = 0) -> torch.nn.Module:
    """lightly's DINOLoss with `objective`'s settings and centre, in float64."""
    with float64_default():
        ref = lightly_loss.DINOLoss(output_dim=objective.out_dim, warmup_teacher_temp=objective.warmup_teacher_temp,
                                    teacher_temp=objective.teacher_temp, warmup_teacher_temp_epochs=warmup_steps,
                                    student_temp=objective.student_temp,
                                    center_momentum=objective.center_momentum)
    ref.center = objective.center.detach().clone().view(1, 1, -1)
    return ref


def lightly_forward(ref: torch.nn.Module, objective: DINOLoss, outputs: dict[str, Tensor],
                    epoch: int | None = None) -> Tensor:
    teachers, students = head_scores(objective, outputs)
    with float64_default():
        return ref(teachers, students, epoch=epoch)


def dino_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, nepochs: int) -> np.ndarray:
    """The authors' teacher-temperature schedule (main_dino.py, DINOLoss.__init__)."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))


def dino_reference(student_output: Tensor, teacher_output: Tensor, center: Tensor, temp: float, ncrops: int,
                   student_temp: float, center_momentum: float) -> tuple[Tensor, Tensor]:
    """The authors' DINOLoss.forward and update_center (main_dino.py) on one process: the loss and the new centre.
    `student_output` is every crop's scores stacked along the batch (globals first), `teacher_output` the globals'."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss = total_loss + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    total_loss = total_loss / n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * center_momentum + batch_center * (1 - center_momentum)


def naive_reference(objective: DINOLoss, outputs: dict[str, Tensor], temp: float) -> tuple[Tensor, Tensor]:
    teachers, students = head_scores(objective, outputs)
    return dino_reference(torch.cat(students), torch.cat(teachers).detach(), objective.center.detach().clone(), temp,
                          len(students), objective.student_temp, objective.center_momentum)


def gradient_inputs(objective: DINOLoss, outputs: dict[str, Tensor]) -> list[Tensor]:
    """The tensors whose gradients are compared: every student embedding and the student's prototypes."""
    return [*(outputs[key] for key in student_keys(objective.local_crops)), objective.prototypes]


def assert_matches(loss: Tensor, ref_loss: Tensor, inputs: list[Tensor]) -> dict[str, float]:
    """The float64 loss within 1e-12 relative of the reference's, and the gradients w.r.t. `inputs` within 1e-10
    of the reference's largest gradient entry; returns the largest errors seen."""
    got = torch.autograd.grad(loss, inputs, retain_graph=True)
    want = torch.autograd.grad(ref_loss, inputs)
    assert loss.dtype == ref_loss.dtype == F64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0.0)
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0.0, atol=1e-10 * scale)
    return {"loss": (loss - ref_loss).abs().item(), "grad": max((g - w).abs().max().item()
                                                                for g, w in zip(got, want, strict=True))}


def assert_center(objective: DINOLoss, center: Tensor) -> float:
    torch.testing.assert_close(objective.center, center.reshape(1, -1), rtol=0.0, atol=1e-14)
    return (objective.center - center.reshape(1, -1)).abs().max().item()


# ---------------------------------------------------------------- against lightly and the authors' code


@pytest.mark.parametrize("center_momentum", [0.9, 0.5])
@pytest.mark.parametrize(("batch", "local_crops"), [(2, 0), (8, 0), (8, 2), (5, 3), (16, 6)])
def test_matches_lightly(lightly_loss: types.ModuleType, batch: int, local_crops: int,
                         center_momentum: float) -> None:
    """Loss, gradients w.r.t. the student embeddings and prototypes, and the centre after the step, from the same
    leaf tensors and the same starting centre; the authors' loss too."""
    objective = make_dino(local_crops, seed=batch, center_momentum=center_momentum, **TEMPS)
    ref = make_lightly(lightly_loss, objective)
    outputs = make_outputs(batch, local_crops, seed=batch)
    naive_loss, naive_center = naive_reference(objective, outputs, objective.teacher_temp)
    loss = objective(outputs)["loss"]
    assert_matches(loss, lightly_forward(ref, objective, outputs), gradient_inputs(objective, outputs))
    assert_matches(loss, naive_loss, gradient_inputs(objective, outputs))
    objective.after_optimizer_step()
    assert_center(objective, ref.center)
    assert_center(objective, naive_center)


@pytest.mark.parametrize("local_crops", [0, 2, 5])
def test_excluded_pairs_are_the_same_crop(local_crops: int) -> None:
    """lightly zeroes the diagonal of its [teacher views x student views] loss matrix: with the globals first among
    the student's crops, exactly the pairs (aug1, aug1) and (aug2, aug2), which are DINOLoss's v == q. The loss is
    the mean of the cross-entropy matrix over the other entries."""
    cells = torch.ones(2, 2 + local_crops)
    cells.fill_diagonal_(0)
    assert {tuple(i) for i in (cells == 0).nonzero().tolist()} == {(0, 0), (1, 1)}
    objective = make_dino(local_crops, **TEMPS)
    assert objective.inputs[:2] == SSL_VIEWS
    outputs = make_outputs(6, local_crops, seed=3)
    teachers, students = head_scores(objective, outputs)
    targets = [F.softmax((t - objective.center) / objective.teacher_temp, dim=-1) for t in teachers]
    logs = [F.log_softmax(s / objective.student_temp, dim=-1) for s in students]
    matrix = torch.stack([torch.stack([-(t * s).sum(-1).mean() for s in logs]) for t in targets]).detach()
    loss = objective(outputs)["loss"].detach()
    torch.testing.assert_close(loss, matrix[cells.bool()].mean(), rtol=1e-12, atol=0.0)
    assert not torch.isclose(loss, matrix.mean(), rtol=1e-6)


@pytest.mark.parametrize("warmup", [0, 1, 2, 4])
def test_teacher_temperature_warmup_matches_lightly_epochs(lightly_loss: types.ModuleType, warmup: int) -> None:
    """Optimizer steps play lightly's (and the authors') epochs: warmup_teacher_temp_steps=W against
    warmup_teacher_temp_epochs=W, with after_optimizer_step between forwards; loss, gradients and centre at every
    step, and the temperature against the authors' numpy schedule."""
    steps = warmup + 2
    objective = make_dino(1, warmup_teacher_temp_steps=warmup, **TEMPS)
    ref = make_lightly(lightly_loss, objective, warmup_steps=warmup)
    schedule = dino_schedule(objective.warmup_teacher_temp, objective.teacher_temp, warmup, steps)
    temps = []
    for step in range(steps):
        assert int(objective.steps) == step
        temps.append(objective.current_teacher_temp())
        assert temps[-1] == pytest.approx(float(schedule[step]), rel=1e-14, abs=0.0)
        outputs = make_outputs(6, 1, seed=step)
        naive_loss, naive_center = naive_reference(objective, outputs, float(schedule[step]))
        loss = objective(outputs)["loss"]
        assert_matches(loss, lightly_forward(ref, objective, outputs, epoch=step), gradient_inputs(objective, outputs))
        assert_matches(loss, naive_loss, gradient_inputs(objective, outputs))
        objective.after_optimizer_step()
        assert_center(objective, ref.center)
        assert_center(objective, naive_center)
    assert temps[warmup:] == [objective.teacher_temp] * (steps - warmup)
    if warmup >= 1:
        assert temps[0] == objective.warmup_teacher_temp
    if warmup >= 2:
        assert temps[warmup - 1] == pytest.approx(objective.teacher_temp, rel=1e-15)
        assert temps[:warmup] == sorted(temps[:warmup]) and len(set(temps[:warmup])) == warmup


# ---------------------------------------------------------------- the teacher's prototypes


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.996, 1.0])
def test_after_teacher_update_is_an_ema_of_the_prototypes(momentum: float) -> None:
    objective = make_dino()
    student, teacher = objective.prototypes.detach().clone(), objective.teacher_prototypes.clone()
    objective.after_teacher_update(momentum)
    torch.testing.assert_close(objective.teacher_prototypes, momentum * teacher + (1 - momentum) * student,
                               rtol=1e-15, atol=1e-15)
    assert torch.equal(objective.prototypes, student)
    assert not objective.teacher_prototypes.requires_grad
    names = dict(objective.named_parameters())
    assert list(names) == ["prototypes"] and "teacher_prototypes" in dict(objective.named_buffers())
    # Without prototypes there is nothing to move.
    DINOLoss(out_dim=OUT_DIM).after_teacher_update(momentum)


def test_teacher_scores_use_the_teacher_prototypes() -> None:
    """The teacher's prototypes give the targets: moving them changes the loss, and no gradient reaches them."""
    objective = make_dino(**TEMPS)
    outputs = make_outputs(6)
    before = objective(outputs)["loss"].detach()
    objective.after_teacher_update(0.0)
    after = objective(outputs)["loss"]
    assert not torch.isclose(before, after.detach(), rtol=1e-6)
    after.backward()
    assert objective.teacher_prototypes.grad is None and objective.prototypes.grad is not None


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_batch_of_two_is_finite(dtype: torch.dtype) -> None:
    objective = make_dino(2, dtype=dtype)
    outputs = make_outputs(2, 2, dtype=dtype)
    result = objective(outputs)
    assert set(result) == {"loss", "dino_loss", "dino_teacher_entropy"}
    assert all(torch.isfinite(v) and v.dtype == dtype for v in result.values())
    grads = torch.autograd.grad(result["loss"], gradient_inputs(objective, outputs))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    objective.after_optimizer_step()
    assert torch.isfinite(objective.center).all()


@pytest.mark.parametrize("same_views", [False, True])
def test_identical_samples_give_finite_loss_and_gradients(same_views: bool) -> None:
    """Every sample the same (complete collapse), within each crop or in every crop."""
    gen = torch.Generator().manual_seed(4)
    keys = (*student_keys(2), *TEACHER_KEYS)
    rows = torch.randn(1 if same_views else len(keys), 1, DIM, generator=gen, dtype=F64)
    outputs = {key: rows[0 if same_views else i].expand(8, DIM).clone().requires_grad_(not key.startswith("teacher"))
               for i, key in enumerate(keys)}
    objective = make_dino(2, **TEMPS)
    for _ in range(3):
        result = objective(outputs)
        assert all(torch.isfinite(v) for v in result.values())
        grads = torch.autograd.grad(result["loss"], gradient_inputs(objective, outputs))
        assert all(torch.isfinite(g).all() for g in grads)
        for grad in grads[:-1]:  # identical rows get identical gradients
            torch.testing.assert_close(grad, grad[:1].expand_as(grad), rtol=1e-12, atol=1e-15)
        objective.after_optimizer_step()
        assert torch.isfinite(objective.center).all()


BAD_HYPER_PARAMETERS = (
    [("out_dim", bad) for bad in (0, -1, 2.0, True, None)]
    + [("local_crops", bad) for bad in (-1, 1.5, True, "2")]
    + [(name, bad) for name in ("student_temp", "teacher_temp", "warmup_teacher_temp")
       for bad in (0.0, -0.1, float("nan"), float("inf"), "x", True, None)]
    + [("warmup_teacher_temp_steps", bad) for bad in (-1, 3.0, True)]
    + [("center_momentum", bad) for bad in (-0.1, 1.5, float("nan"), "x", True, None)]
    + [("dim", bad) for bad in (0, -4, 2.5, False)]
)


@pytest.mark.parametrize(("kwarg", "bad"), BAD_HYPER_PARAMETERS, ids=[f"{k}={b!r}" for k, b in BAD_HYPER_PARAMETERS])
def test_bad_hyper_parameters_raise_one_line_naming_them(kwarg: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"DINOLoss {kwarg} must be") as info:
        DINOLoss(**{kwarg: bad})
    assert "\n" not in str(info.value)


def test_good_edge_hyper_parameters_are_accepted() -> None:
    objective = DINOLoss(out_dim=1, local_crops=0, center_momentum=1, warmup_teacher_temp_steps=0, dim=1,
                         student_temp=1, teacher_temp=2)
    assert (objective.center_momentum, objective.student_temp, objective.teacher_temp) == (1.0, 1.0, 2.0)
    assert DINOLoss(center_momentum=0.0, out_dim=4).center_momentum == 0.0


def test_bind_builds_or_checks_the_prototypes() -> None:
    from slip.models.keywords import vit_spec

    spec = vit_spec(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16,
                    ssl_mlp_dim=32, ssl_embed_dim=8)
    objective = DINOLoss(out_dim=OUT_DIM)
    assert objective.prototypes is None
    objective.bind(spec)
    assert objective.prototypes.shape == objective.teacher_prototypes.shape == (OUT_DIM, 8)
    assert torch.equal(objective.prototypes.detach(), objective.teacher_prototypes)
    prototypes = objective.prototypes
    objective.bind(spec)  # the same width again: kept as it is
    assert objective.prototypes is prototypes
    with pytest.raises(ValueError, match="built for 16-d SSL embeddings but the model's SSL head gives 8") as info:
        DINOLoss(out_dim=OUT_DIM, dim=16).bind(spec)
    assert "\n" not in str(info.value)


def test_forward_without_prototypes_raises() -> None:
    with pytest.raises(RuntimeError, match="no prototypes"):
        DINOLoss(out_dim=OUT_DIM)(make_outputs(4))


def test_inputs_include_the_local_views_in_order() -> None:
    assert DINOLoss(out_dim=4).inputs == ("aug1", "aug2")
    assert DINOLoss(out_dim=4, local_crops=3).inputs == ("aug1", "aug2", "local1", "local2", "local3")
    assert DINOLoss.teacher_views == ("aug1", "aug2")
    assert DINOLoss(out_dim=4, name="d").metrics == ("d_teacher_entropy",)
    outputs = make_outputs(4, 3)
    with pytest.raises(MissingOutputError, match="local3_embed"):
        make_dino(3)({k: v for k, v in outputs.items() if k != "local3_embed"})
    with pytest.raises(MissingOutputError, match="teacher_aug2_embed"):
        make_dino(3)({k: v for k, v in outputs.items() if k != "teacher_aug2_embed"})


def test_local_crops_are_read_by_name() -> None:
    """Swapping two local crops' outputs swaps their gradients and keeps the loss; swapping a global with a local
    crop changes it (the globals are the ones paired with the teacher's views of the same crop)."""
    objective = make_dino(2, **TEMPS)
    outputs = make_outputs(6, 2, seed=9)
    swapped = {**leaves(outputs), "local1_embed": outputs["local2_embed"].detach().clone().requires_grad_(),
               "local2_embed": outputs["local1_embed"].detach().clone().requires_grad_()}
    loss, loss_swapped = objective(outputs)["loss"], objective(swapped)["loss"]
    torch.testing.assert_close(loss, loss_swapped, rtol=1e-12, atol=0.0)
    loss.backward()
    loss_swapped.backward()
    torch.testing.assert_close(outputs["local1_embed"].grad, swapped["local2_embed"].grad, rtol=1e-12, atol=0.0)
    crossed = {**leaves(outputs), "aug1_embed": outputs["local1_embed"].detach(),
               "local1_embed": outputs["aug1_embed"].detach()}
    assert not torch.isclose(objective(crossed)["loss"].detach(), loss.detach(), rtol=1e-6)


def test_teacher_entropy_and_result_keys() -> None:
    objective = make_dino(1, name="distill", **TEMPS)
    outputs = make_outputs(6, 1)
    result = objective(outputs)
    assert set(result) == {"loss", "distill_loss", "distill_teacher_entropy"}
    assert torch.equal(result["distill_loss"], result["loss"].detach()) and not result["distill_loss"].requires_grad
    teachers, _ = head_scores(objective, outputs)
    targets = [F.softmax((t - objective.center) / objective.teacher_temp, dim=-1).detach() for t in teachers]
    entropy = torch.stack([-(p * p.log()).sum(-1).mean() for p in targets]).mean()
    torch.testing.assert_close(result["distill_teacher_entropy"], entropy, rtol=1e-12, atol=0.0)
    assert 0 < entropy < math.log(OUT_DIM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_results(dtype: torch.dtype) -> None:
    objective = make_dino(1, dtype=torch.float32)
    low = make_outputs(4, 1, dtype=dtype)
    result = objective(low)
    assert all(v.dtype == torch.float32 for v in result.values())
    upcast = {k: v.detach().float() for k, v in low.items()}
    torch.testing.assert_close(result["loss"].detach(), make_dino(1, dtype=torch.float32)(upcast)["loss"],
                               rtol=1e-6, atol=0.0)
    result["loss"].backward()
    assert low["aug1_embed"].grad.dtype == dtype


# ---------------------------------------------------------------- several forwards per optimizer step


def test_two_forwards_then_one_step_centre_on_both(lightly_loss: types.ModuleType) -> None:
    """Two forwards (micro-batches of one step) both use the centre from before the step, which then moves to
    the mean teacher score over both: as lightly's one forward on the two micro-batches together. The warm-up
    counts the step once."""
    objective = make_dino(2, warmup_teacher_temp_steps=3, **TEMPS)
    ref = make_lightly(lightly_loss, objective, warmup_steps=3)
    first, second = make_outputs(4, 2, seed=1), make_outputs(4, 2, seed=2)
    fresh = make_dino(2, warmup_teacher_temp_steps=3, **TEMPS)
    temp = objective.current_teacher_temp()
    loss1 = objective(first)["loss"].detach()
    loss2 = objective(second)["loss"].detach()
    assert objective.current_teacher_temp() == temp and int(objective.steps) == 0
    assert int(objective.pending_rows) == 16
    torch.testing.assert_close(loss2, fresh(leaves(second))["loss"].detach(), rtol=1e-12, atol=0.0)
    whole = {k: torch.cat([first[k], second[k]]).detach() for k in first}
    ref_loss = lightly_forward(ref, objective, whole, epoch=0)
    torch.testing.assert_close((loss1 + loss2) / 2, ref_loss, rtol=1e-12, atol=0.0)
    objective.after_optimizer_step()
    assert_center(objective, ref.center)
    teachers, _ = head_scores(objective, whole)
    mean = torch.cat(teachers).mean(0, keepdim=True)
    torch.testing.assert_close(objective.center, 0.9 * fresh.center + 0.1 * mean, rtol=0.0, atol=1e-14)
    assert int(objective.pending_rows) == 0 and int(objective.steps) == 1
    # A step with no forward since the last one keeps the centre and counts the step.
    center = objective.center.clone()
    objective.after_optimizer_step()
    assert torch.equal(objective.center, center) and int(objective.steps) == 2


def test_centre_and_steps_in_the_state_dict() -> None:
    objective = make_dino(**TEMPS, warmup_teacher_temp_steps=5)
    objective(make_outputs(4))
    objective.after_optimizer_step()
    state = objective.state_dict()
    assert {"prototypes", "teacher_prototypes", "center", "steps"} <= set(state)
    assert not {"pending_sum", "pending_rows"} & set(state)
    restored = make_dino(seed=7, **TEMPS, warmup_teacher_temp_steps=5)
    restored.load_state_dict(state)
    assert restored.current_teacher_temp() == objective.current_teacher_temp() != objective.warmup_teacher_temp
    assert torch.equal(restored.center, objective.center)


# ---------------------------------------------------------------- two real processes

WORLD_SIZE, GLOBAL_BATCH, RANK_CROPS = 2, 8, 2
RANK_SETTINGS = dict(warmup_teacher_temp_steps=3, center_momentum=0.8, **TEMPS)
RANK_STEPS = 2


def global_outputs(step: int) -> dict[str, Tensor]:
    """The same seeded float64 global batch of step `step` in every process."""
    return {k: v.detach() for k, v in make_outputs(GLOBAL_BATCH, RANK_CROPS, seed=20 + step).items()}


def run_steps(objective: DINOLoss, rows: slice) -> list[dict[str, Tensor]]:
    """Per step: a forward and backward on `rows` of the global batch, then after_optimizer_step; the results, the
    gradients and the centre."""
    records = []
    for step in range(RANK_STEPS):
        inputs = leaves({k: v[rows] for k, v in global_outputs(step).items()})
        result = objective(inputs)
        result["loss"].backward()
        record = {k: v.detach() for k, v in result.items()}
        record.update({key: inputs[key].grad for key in student_keys(RANK_CROPS)})
        record["prototypes"] = objective.prototypes.grad.clone()
        record["pending_rows"] = int(objective.pending_rows)
        objective.prototypes.grad = None
        objective.after_optimizer_step()
        record["center"] = objective.center.clone()
        records.append(record)
    return records


def _worker(rank: int, port: int) -> list[dict[str, Tensor]]:
    """One rank: its rows of every step's global batch."""
    with gloo_world(rank, port, WORLD_SIZE) as world:
        local = GLOBAL_BATCH // WORLD_SIZE
        records = run_steps(make_dino(RANK_CROPS, gather=make_gather(world), **RANK_SETTINGS),
                            slice(rank * local, (rank + 1) * local))
    return records


rank_results = ranks_fixture(_worker, WORLD_SIZE, timeout=120)


@pytest.mark.parametrize("step", range(RANK_STEPS))
def test_two_ranks_match_single_process(rank_results: list[list[dict[str, Tensor]]], step: int) -> None:
    """The mean of the ranks' losses (and teacher entropies) is the one-process value; their gradients, averaged
    as DDP does, are its gradients; the centre after each step is the same on both ranks and the one-process
    centre (the second step's loss depends on it, and on the warm-up's second temperature)."""
    single = run_steps(make_dino(RANK_CROPS, **RANK_SETTINGS), slice(None))[step]
    ranks = [r[step] for r in rank_results]
    assert single["loss"].dtype == F64
    for key in ("loss", "dino_loss", "dino_teacher_entropy"):
        torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD_SIZE, single[key], rtol=1e-12, atol=0.0)
    assert [r["pending_rows"] for r in ranks] == [2 * GLOBAL_BATCH] * WORLD_SIZE == [single["pending_rows"]] * 2
    for key in student_keys(RANK_CROPS):
        rank_rows = torch.cat([r[key] for r in ranks]) / WORLD_SIZE
        torch.testing.assert_close(rank_rows, single[key], rtol=0.0, atol=1e-12 * single[key].abs().max().item())
    prototypes = sum(r["prototypes"] for r in ranks) / WORLD_SIZE
    torch.testing.assert_close(prototypes, single["prototypes"], rtol=0.0,
                               atol=1e-12 * single["prototypes"].abs().max().item())
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    torch.testing.assert_close(ranks[0]["center"], single["center"], rtol=0.0, atol=1e-15)


def test_a_skipped_step_does_not_move_the_centre_with_its_teacher_scores() -> None:
    """The engine skips a step with a non-finite loss; the next step's centre ignores that step's teacher rows."""
    torch.manual_seed(0)
    dino = DINOLoss(out_dim=8, dim=4)
    keys = ("aug1_embed", "aug2_embed", "teacher_aug1_embed", "teacher_aug2_embed")
    bad = {key: torch.randn(2, 4) for key in keys}
    bad["teacher_aug1_embed"][0, 0] = float("inf")
    assert not torch.isfinite(dino(bad)["loss"])
    dino.after_skipped_step()
    clean = {key: torch.randn(2, 4) for key in keys}
    alone = DINOLoss(out_dim=8, dim=4)
    alone.load_state_dict(dino.state_dict())
    dino(clean)
    dino.after_optimizer_step()
    alone(clean)
    alone.after_optimizer_step()
    assert torch.isfinite(dino.center).all() and torch.equal(dino.center, alone.center)


# ---------------------------------------------------------------- N global crops


def multi_global_outputs(batch: int, global_crops: int, local_crops: int, seed: int = 0) -> dict[str, Tensor]:
    """`make_outputs` for `global_crops` globals: the student's of every crop and the teacher's of every global."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, DIM, generator=gen, dtype=F64)
    views = (*global_views(global_crops), *local_views(local_crops))
    students = {view: base + 0.5 * torch.randn(batch, DIM, generator=gen, dtype=F64) for view in views}
    teachers = {teacher_key(f"{view}_embed"): students[view] + 0.2 * torch.randn(batch, DIM, generator=gen, dtype=F64)
                for view in global_views(global_crops)}
    return {**{f"{view}_embed": value.requires_grad_() for view, value in students.items()}, **teachers}


@pytest.mark.parametrize("center_momentum", [0.9, 0.5])
@pytest.mark.parametrize(("batch", "global_crops", "local_crops"), [(2, 3, 0), (6, 3, 2), (5, 4, 1)])
def test_n_global_crops_match_lightly(lightly_loss: types.ModuleType, batch: int, global_crops: int,
                                      local_crops: int, center_momentum: float) -> None:
    """N globals (aug1 ... augN, all embedded by the teacher) and M locals: loss, gradients w.r.t. every student
    embedding and the prototypes, and the centre after the step, against lightly's DINOLoss given the N teacher and
    N + M student views; only the N same-view pairs are left out (lightly's zeroed diagonal). Measured: loss within
    4.5e-16, gradients within 2.8e-17, centre within 7e-18."""
    objective = make_dino(local_crops, seed=batch, center_momentum=center_momentum, global_crops=global_crops,
                          **TEMPS)
    assert objective.teacher_views == global_views(global_crops)
    assert objective.inputs == (*global_views(global_crops), *local_views(local_crops))
    ref = make_lightly(lightly_loss, objective)
    outputs = multi_global_outputs(batch, global_crops, local_crops, seed=batch)
    students = [scores(outputs[f"{view}_embed"], objective.prototypes) for view in objective.inputs]
    teachers = [scores(outputs[teacher_key(f"{view}_embed")], objective.teacher_prototypes)
                for view in objective.teacher_views]
    with float64_default():
        ref_loss = ref(teachers, students)
    loss = objective(outputs)["loss"]
    inputs = [*(outputs[f"{view}_embed"] for view in objective.inputs), objective.prototypes]
    assert_matches(loss, ref_loss, inputs)
    targets = [F.softmax((t - objective.center) / objective.teacher_temp, dim=-1) for t in teachers]
    logs = [F.log_softmax(s / objective.student_temp, dim=-1) for s in students]
    matrix = torch.stack([torch.stack([-(t * s).sum(-1).mean() for s in logs]) for t in targets]).detach()
    kept = ~torch.eye(global_crops, len(students), dtype=torch.bool)
    torch.testing.assert_close(loss.detach(), matrix[kept].mean(), rtol=1e-12, atol=0.0)
    assert int(objective.pending_rows) == global_crops * batch
    objective.after_optimizer_step()
    assert_center(objective, ref.center)


def test_the_teacher_embeds_the_n_global_crops_in_a_training_task() -> None:
    """The task's momentum teacher embeds aug1 ... aug3 and the objective reads all three of its embeddings."""
    from slip.app.task import TeacherSettings, TrainTask
    from slip.models import build_vit_model

    objective = DINOLoss(out_dim=OUT_DIM, global_crops=3, local_crops=1)
    torch.manual_seed(0)
    model = build_vit_model(image_size=16, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
                            embed_dim=16, ssl_mlp_dim=32, ssl_embed_dim=8, inputs=list(objective.inputs))
    objective.bind(model.spec)
    teacher = TeacherSettings(0.9, "cosine", False).teacher_for(model, objective, total_steps=2)
    assert teacher.views == ("aug1", "aug2", "aug3")
    task = TrainTask(model, objective, teacher=teacher)
    batch = {name: torch.randn(4, 3, 8 if name == "local1" else 16, 8 if name == "local1" else 16)
             for name in objective.inputs}
    assert set(task.teacher_outputs(batch)) == {teacher_key(f"{view}_embed") for view in global_views(3)}
    result = task(batch)
    result["loss"].backward()
    assert torch.isfinite(result["loss"]) and int(objective.pending_rows) == 3 * 4
    assert model.visual.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [1, 0, -2, 2.5, True, "3", None])
def test_a_bad_global_crops_raises_one_line_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="^DINOLoss global_crops must be an integer >= 2, got ") as info:
        DINOLoss(out_dim=4, global_crops=bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("overrides", "node", "message"), [
    (["loss=dino", "loss.global_crops=1"], "loss",
     r"^loss\.global_crops: DINOLoss global_crops must be an integer >= 2, got 1$"),
    (["loss=dino", "loss.global_crops=4", "augment.global_crops=3"], "augment",
     r"^augment\.global_crops: inputs name global view 'aug4' but augment\.global_crops=3 builds "
     r"\['aug1', 'aug2', 'aug3'\]$"),
    (["loss=clip_dino", "augment.global_crops=1"], "augment",
     r"^augment\.global_crops: global_crops must be an integer >= 2"),
])
def test_bad_global_crops_in_the_config_name_the_key(overrides: list[str], node: str, message: str) -> None:
    from slip.app.config import ConfigError, build
    from train_helpers import compose_config

    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message) as info:
        objective = build(cfg.loss, "loss")
        build(cfg.augment, "augment")(inputs=objective.inputs, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{node}.")


def test_the_presets_write_global_crops_and_the_augment_node_follows_them() -> None:
    from slip.app.config import build
    from train_helpers import compose_config

    for overrides, key in ((["loss=dino"], "loss.global_crops"),
                           (["loss=clip_dino"], "loss.terms.dino.objective.global_crops")):
        assert compose_config(*overrides).augment.global_crops == 2
        cfg = compose_config(*overrides, f"{key}=3")
        assert cfg.augment.global_crops == 3
        objective = build(cfg.loss, "loss")
        assert objective.teacher_views == ("aug1", "aug2", "aug3") and "aug3" in objective.inputs
