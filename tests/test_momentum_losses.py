"""BYOL and MoCo v3 (slip.momentum_losses): float64 against lightly (BYOL) and against a naive reference written
from the MoCo v3 paper's pseudocode, edge cases, and two gloo ranks (SyncBatchNorm1d predictor) against one process
on the same global batch."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import Tensor, nn

from slip.distributed import SyncBatchNorm1d, convert_sync_batchnorm, make_gather
from slip.losses import MissingOutputError, Objective
from slip.momentum_losses import BYOLLoss, MoCoV3Loss
from slip.teacher import teacher_key
from loss_helpers import assert_matches, leaves
from rank_helpers import gloo_world, ranks_fixture

DIM, HIDDEN = 16, 32
BATCH_SIZES = [2, 3, 16]
STUDENTS = ("aug1_embed", "aug2_embed")
TEACHERS = tuple(teacher_key(key) for key in STUDENTS)
OBJECTIVES: dict[str, type[Objective]] = {"byol": BYOLLoss, "mocov3": MoCoV3Loss}

pytestmark = pytest.mark.usefixtures("one_thread")


def embeddings(batch: int, dim: int = DIM, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """The student's and the teacher's embeddings of two views: four correlated random [batch, dim] leaf tensors
    requiring grad (the teacher's too, so that a gradient reaching them would show)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, batch, dim, generator=gen, dtype=torch.float64) * 0.5
    keys = (*STUDENTS, *TEACHERS)
    return {key: (base + noise[i]).to(dtype).requires_grad_() for i, key in enumerate(keys)}



def make(name: str, seed: int = 0, **kwargs) -> Objective:
    """A float64 objective with a DIM-wide predictor of hidden width HIDDEN, initialised from `seed`."""
    torch.manual_seed(seed)
    return OBJECTIVES[name](hidden_dim=HIDDEN, dim=DIM, **kwargs).double()


def predictor_of(objective: Objective) -> nn.Module:
    assert objective.predictor is not None
    return objective.predictor


# ---------------------------------------------------------------- BYOL vs lightly


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_byol_matches_lightly(lightly_loss: types.ModuleType, batch: int) -> None:
    """The paper's symmetrised L + L~, each 2 - 2 cos averaged over the batch, from lightly's
    NegativeCosineSimilarity (the mean of -cos): (2 + 2 ncs(p1, z2')) + (2 + 2 ncs(p2, z1')). The reference runs a
    copy of the objective's predictor on each view separately (so each view's BatchNorm statistics are its own)."""
    objective = make("byol")
    reference = copy.deepcopy(predictor_of(objective))
    ours, ref = embeddings(batch), embeddings(batch)
    result = objective(ours)
    ncs = lightly_loss.NegativeCosineSimilarity()
    p1, p2 = reference(ref["aug1_embed"]), reference(ref["aug2_embed"])
    z1, z2 = ref["teacher_aug1_embed"].detach(), ref["teacher_aug2_embed"].detach()
    ref_loss = (2 + 2 * ncs(p1, z2)) + (2 + 2 * ncs(p2, z1))
    assert_matches(result["loss"], ref_loss, [*(ours[k] for k in STUDENTS), *predictor_of(objective).parameters()],
                   [*(ref[k] for k in STUDENTS), *reference.parameters()])
    torch.testing.assert_close(result["byol_cosine"], -(ncs(p1, z2) + ncs(p2, z1)).detach() / 2, rtol=1e-12,
                               atol=1e-15)
    assert set(result) == {"loss", "byol_loss", "byol_cosine"}
    assert all(not v.requires_grad for k, v in result.items() if k != "loss")


# ---------------------------------------------------------------- MoCo v3 vs the paper's pseudocode


def ref_mocov3(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float) -> Tensor:
    """Algorithm 1 of Chen, Xie and He (2021): ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = CE(q k^T / T, arange) 2T over
    L2-normalised q and k, with the cross-entropy written out."""

    def ctr(q: Tensor, k: Tensor) -> Tensor:
        q = q / (q * q).sum(1, keepdim=True).sqrt()
        k = k / (k * k).sum(1, keepdim=True).sqrt()
        logits = q @ k.T / temperature
        n = q.shape[0]
        return -sum(logits[i, i] - logits[i].exp().sum().log() for i in range(n)) / n * 2 * temperature

    return ctr(q1, k2) + ctr(q2, k1)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_mocov3_matches_paper(batch: int, temperature: float) -> None:
    """Against the paper, not lightly: lightly has no MoCo v3 loss with exactly these negatives (its NTXentLoss
    also takes the other view's queries as negatives, where MoCo v3's negatives are the teacher's keys of the
    other samples only)."""
    objective = make("mocov3", temperature=temperature)
    reference = copy.deepcopy(predictor_of(objective))
    ours, ref = embeddings(batch), embeddings(batch)
    result = objective(ours)
    q1, q2 = reference(ref["aug1_embed"]), reference(ref["aug2_embed"])
    k1, k2 = ref["teacher_aug1_embed"].detach(), ref["teacher_aug2_embed"].detach()
    ref_loss = ref_mocov3(q1, q2, k1, k2, temperature)
    assert_matches(result["loss"], ref_loss, [*(ours[k] for k in STUDENTS), *predictor_of(objective).parameters()],
                   [*(ref[k] for k in STUDENTS), *reference.parameters()])
    top1 = (q1 @ (k2 / k2.norm(dim=1, keepdim=True)).T).argmax(1) == torch.arange(batch)  # q1's norm: no matter
    assert result["mocov3_acc"].item() == pytest.approx(top1.double().mean().item() * 100)
    assert set(result) == {"loss", "mocov3_loss", "mocov3_acc"}


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_teacher_gets_no_gradient(name: str) -> None:
    out = embeddings(6)
    make(name)(out)["loss"].backward()
    assert all(out[key].grad is None for key in TEACHERS)
    assert all(torch.isfinite(out[key].grad).all() and out[key].grad.abs().sum() > 0 for key in STUDENTS)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_batch_of_two_is_finite(name: str) -> None:
    objective = make(name)
    out = embeddings(2)
    result = objective(out)
    assert all(torch.isfinite(v) for v in result.values())
    result["loss"].backward()
    assert all(torch.isfinite(out[key].grad).all() for key in STUDENTS)
    assert all(torch.isfinite(p.grad).all() for p in predictor_of(objective).parameters())


def test_identical_samples_give_finite_loss_and_gradients() -> None:
    """Every sample the same (complete collapse): the predictor's BatchNorm sees zero variance, and every MoCo v3
    logit is the same, so each of its cross-entropies is log N."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 1, DIM, generator=gen, dtype=torch.float64)
    batch = 8
    for name in OBJECTIVES:
        objective = make(name)
        out = {key: rows[i].expand(batch, DIM).clone().requires_grad_()
               for i, key in enumerate((*STUDENTS, *TEACHERS))}
        result = objective(out)
        assert all(torch.isfinite(v) for v in result.values())
        params = list(predictor_of(objective).parameters())
        grads = torch.autograd.grad(result["loss"], [*(out[key] for key in STUDENTS), *params])
        assert all(torch.isfinite(g).all() for g in grads)
        if name == "mocov3":
            assert result["loss"].item() == pytest.approx(2 * 2 * 0.2 * math.log(batch), rel=1e-12)


@pytest.mark.parametrize(
    ("name", "kwarg", "bad"),
    [("mocov3", "temperature", bad) for bad in (0.0, -0.1, float("nan"), float("inf"), "0.2", True)]
    + [(name, "hidden_dim", bad) for name in OBJECTIVES for bad in (0, -4, 2.0)]
    + [(name, "dim", bad) for name in OBJECTIVES for bad in (0, -1, True)],
)
def test_bad_hyper_parameters_raise_one_line_naming_them(name: str, kwarg: str, bad: object) -> None:
    cls = OBJECTIVES[name]
    with pytest.raises(ValueError, match=f"{cls.__name__} {kwarg} must be") as info:
        cls(**{"hidden_dim": HIDDEN, kwarg: bad})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_missing_and_mismatched_outputs_raise(name: str) -> None:
    objective, out = make(name), embeddings(4)
    for missing in TEACHERS + STUDENTS:
        with pytest.raises(MissingOutputError, match=missing) as info:
            objective({k: v for k, v in out.items() if k != missing})
        assert isinstance(info.value, KeyError) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="aug2_embed and teacher_aug2_embed"):
        objective({**out, "teacher_aug2_embed": out["teacher_aug2_embed"][:3]})


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_bind_builds_or_checks_the_predictor(name: str) -> None:
    from slip.models.keywords import vit_spec  # here, not at the top: the spawned ranks need not import the models

    spec = vit_spec(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16,
                    ssl_mlp_dim=32, ssl_embed_dim=8)
    cls = OBJECTIVES[name]
    unbuilt = cls(hidden_dim=HIDDEN)
    with pytest.raises(RuntimeError, match=f"{cls.__name__} has no predictor yet"):
        unbuilt(embeddings(4, dim=8))
    unbuilt.bind(spec)
    layers = predictor_of(unbuilt)
    assert (layers.layer1.in_features, layers.layer1.out_features, layers.bn1.num_features,
            layers.layer2.out_features) == (8, HIDDEN, HIDDEN, 8)
    assert torch.isfinite(unbuilt(embeddings(4, dim=8, dtype=torch.float32))["loss"])
    matching = cls(hidden_dim=HIDDEN, dim=8)
    before = predictor_of(matching)
    matching.bind(spec)
    assert predictor_of(matching) is before
    with pytest.raises(ValueError, match=f"{cls.__name__} was built for 16-d SSL embeddings but the model's SSL head "
                                         "gives 8") as info:
        cls(hidden_dim=HIDDEN, dim=16).bind(spec)
    assert "\n" not in str(info.value)


def test_names_and_views() -> None:
    assert BYOLLoss.inputs == MoCoV3Loss.inputs == BYOLLoss.teacher_views == MoCoV3Loss.teacher_views == (
        "aug1", "aug2")
    assert BYOLLoss(dim=4, hidden_dim=4).metrics == ("byol_cosine",)
    assert MoCoV3Loss(dim=4, hidden_dim=4, name="moco").metrics == ("moco_acc",)
    assert "temperature=0.5" in repr(MoCoV3Loss(0.5, hidden_dim=4, dim=4))


# ---------------------------------------------------------------- two real processes

WORLD_SIZE, LOCAL_BATCH = 2, 4


def global_embeddings() -> dict[str, Tensor]:
    """The same seeded float64 global batch in every process."""
    return {k: v.detach() for k, v in embeddings(WORLD_SIZE * LOCAL_BATCH, seed=11).items()}


def run_objective(objective: Objective, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every result entry, the gradients of the student embeddings and of the predictor's parameters
    (`grad.<name>`), and the predictor's buffers (`buffer.<name>`), from leaf copies of `outputs`."""
    inputs = leaves(outputs)
    result = objective(inputs)
    result["loss"].backward()
    layers = predictor_of(objective)
    return {**{k: v.detach() for k, v in result.items()}, **{key: inputs[key].grad for key in STUDENTS},
            **{f"grad.{k}": p.grad for k, p in layers.named_parameters()},
            **{f"buffer.{k}": b.detach().clone() for k, b in layers.named_buffers()}}


def _worker(rank: int, port: int) -> dict:
    """One rank: both objectives on its rows of the global batch, with their predictors' BatchNorm synced."""
    with gloo_world(rank, port, WORLD_SIZE) as world:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {k: v[rows] for k, v in global_embeddings().items()}
        results = {}
        for name in OBJECTIVES:
            objective = convert_sync_batchnorm(make(name, gather=make_gather(world)))
            assert type(predictor_of(objective).bn1) is SyncBatchNorm1d
            results[name] = run_objective(objective, local)
    return results


rank_results = ranks_fixture(_worker, WORLD_SIZE, timeout=120)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_ranks_match_single_process(rank_results: list[dict], name: str) -> None:
    """As in test_ssl_losses: the mean of the ranks' losses (and of their metrics, each over the rank's rows) is
    the one-process loss, and the ranks' gradients, averaged as DDP does (divided by the world size; a rank's
    predictor gradient holds, through the SyncBatchNorm1d's all-reduces, every rank's loss's dependence on its
    rows), are the one-process gradients. The predictor's running statistics, updated from the global batch, are
    the one-process ones on every rank."""
    single = run_objective(make(name), global_embeddings())
    ranks = [r[name] for r in rank_results]
    assert single["loss"].dtype == torch.float64
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for key in (k for k in single if not k.startswith(("grad.", "buffer.")) and k not in STUDENTS):
        torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD_SIZE, single[key], rtol=1e-12, atol=1e-15)
    for key in STUDENTS:
        rank_rows = torch.cat([r[key] for r in ranks]) / WORLD_SIZE
        torch.testing.assert_close(rank_rows, single[key], rtol=0.0, atol=1e-12 * single[key].abs().max().item())
    # One scale for all the predictor's gradients: its first bias's is of rounding size (BatchNorm follows it).
    grads = [k for k in single if k.startswith("grad.")]
    scale = max(single[key].abs().max().item() for key in grads)
    for key in grads:
        averaged = sum(r[key] for r in ranks) / WORLD_SIZE
        torch.testing.assert_close(averaged, single[key], rtol=0.0, atol=1e-12 * scale)
    for key in (k for k in single if k.startswith("buffer.")):
        for r in ranks:
            torch.testing.assert_close(r[key], single[key], rtol=1e-12, atol=1e-15)
    assert single["buffer.bn1.num_batches_tracked"].item() == 2  # one predictor pass per view


@pytest.mark.parametrize("make", [lambda: BYOLLoss(hidden_dim=8, dim=4), lambda: MoCoV3Loss(hidden_dim=8, dim=4)])
def test_views_of_different_batches_are_refused_naming_both(make) -> None:
    objective = make().eval()
    outputs = {"aug1_embed": torch.randn(4, 4), "teacher_aug1_embed": torch.randn(4, 4),
               "aug2_embed": torch.randn(1, 4), "teacher_aug2_embed": torch.randn(1, 4)}
    with pytest.raises(ValueError, match=r"needs 2-D aug1_embed and aug2_embed of equal shape"):
        objective(outputs)
