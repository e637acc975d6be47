"""VICReg and Barlow Twins: float64 against lightly and against naive references written from the papers, edge
cases, and two gloo ranks against one process on the same global batch."""
from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor

from slip.distributed import make_gather
from slip.losses import CLIPLoss, ComposedObjective, MissingOutputError, Objective, Term
from slip.ssl_losses import BarlowTwinsLoss, VICRegLoss
from loss_helpers import assert_matches, leaves
from rank_helpers import gloo_world, ranks_fixture

BATCH_SIZES = [2, 3, 16, 64]
DIM = 24
OBJECTIVES: dict[str, type[Objective]] = {"vicreg": VICRegLoss, "barlow": BarlowTwinsLoss}
VIEWS = ("aug1_embed", "aug2_embed")

pytestmark = pytest.mark.usefixtures("one_thread")


def views(batch: int, dim: int = DIM, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Two correlated random views whose dimensions' stds span about 0.22 to 2.2, as leaf tensors requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 2.0, dim, dtype=torch.float64)
    base = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale
    noise = torch.randn(2, batch, dim, generator=gen, dtype=torch.float64) * 0.5 * scale
    return {key: (base + noise[i]).to(dtype).requires_grad_() for i, key in enumerate(VIEWS)}



# ---------------------------------------------------------------- naive float64 references from the papers


def ref_vicreg(z_a: Tensor, z_b: Tensor, sim: float = 25.0, var: float = 25.0, cov: float = 1.0,
               eps: float = 1e-4, gamma: float = 1.0) -> Tensor:
    """VICReg's eq. (6) and Algorithm 1: lambda s + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]."""
    n, d = z_a.shape

    def v(z: Tensor) -> Tensor:
        centred = z - z.sum(0) / n
        std = ((centred ** 2).sum(0) / (n - 1) + eps).sqrt()
        return torch.clamp(gamma - std, min=0).sum() / d

    def c(z: Tensor) -> Tensor:
        centred = z - z.sum(0) / n
        covariance = torch.einsum("bi,bj->ij", centred, centred) / (n - 1)
        return ((covariance * (1 - torch.eye(d, dtype=z.dtype))) ** 2).sum() / d

    s = ((z_a - z_b) ** 2).sum() / (n * d)
    return sim * s + var * (v(z_a) + v(z_b)) + cov * (c(z_a) + c(z_b))


def ref_barlow(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> Tensor:
    """Barlow Twins' eq. (1) and (2), with the batch-centred columns' cosines as C (eps added to each column's
    mean square, as BatchNorm does)."""
    n, d = z_a.shape
    a, b = z_a - z_a.sum(0) / n, z_b - z_b.sum(0) / n
    norms = ((a ** 2).sum(0) + n * eps).sqrt()[:, None] * ((b ** 2).sum(0) + n * eps).sqrt()[None, :]
    c = torch.einsum("bi,bj->ij", a, b) / norms
    off = c * (1 - torch.eye(d, dtype=c.dtype))
    return ((1 - c.diagonal()) ** 2).sum() + lambd * (off ** 2).sum()


# ---------------------------------------------------------------- value and gradients vs lightly and the papers


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 0.5, 3.0)])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_vicreg_matches_lightly(lightly_loss: types.ModuleType, batch: int, coeffs: tuple[float, float, float]) -> None:
    """lightly follows the authors' code, which halves the variance term: mu * [v(Z) + v(Z')] / 2, where the
    paper's eq. (6) and Algorithm 1 have mu * [v(Z) + v(Z')]; so our var_coeff is lightly's mu_param / 2. lightly
    also fixes the std target gamma at 1 (see the paper reference for other targets). Its invariance and
    covariance terms (unbiased covariance, squared off-diagonal sum / D per view, summed) are the paper's; with
    gather_distributed it takes the invariance over the local rows only, which gives the same mean over ranks."""
    sim, var, cov = coeffs
    ours, ref = views(batch), views(batch)
    result = VICRegLoss(sim, var, cov)(ours)
    ref_loss = lightly_loss.VICRegLoss(lambda_param=sim, mu_param=2 * var, nu_param=cov)(*ref.values())
    assert_matches(result["loss"], ref_loss, list(ours.values()), list(ref.values()))
    from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss
    a, b = (v.detach() for v in ours.values())
    torch.testing.assert_close(result["vicreg_invariance"], invariance_loss(a, b), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(result["vicreg_variance"], variance_loss(a) + variance_loss(b), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(result["vicreg_covariance"], covariance_loss(a) + covariance_loss(b), rtol=1e-12,
                               atol=0.0)


@pytest.mark.parametrize("lambd", [0.0051, 0.05])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_barlow_matches_lightly(lightly_loss: types.ModuleType, batch: int, lambd: float) -> None:
    """lightly standardises with F.batch_norm (biased variance, eps 1e-5), as the authors' code does with
    BatchNorm1d(affine=False): our default eps. Its default lambda_param is 5e-3 (the paper's text), ours 0.0051
    (the authors' code), so it is passed explicitly. (Not tested here: with gather_distributed, lightly standardises
    each rank's rows with that rank's own mean and std and averages the ranks' C, where the authors' code, through
    SyncBatchNorm, and this module use the global batch's statistics.)"""
    ours, ref = views(batch), views(batch)
    result = BarlowTwinsLoss(lambd)(ours)
    ref_loss = lightly_loss.BarlowTwinsLoss(lambda_param=lambd)(*ref.values())
    assert_matches(result["loss"], ref_loss, list(ours.values()), list(ref.values()))


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_vicreg_matches_paper(batch: int, gamma: float) -> None:
    ours, ref = views(batch), views(batch)
    result = VICRegLoss(std_target=gamma)(ours)
    ref_loss = ref_vicreg(*ref.values(), gamma=gamma)
    assert_matches(result["loss"], ref_loss, list(ours.values()), list(ref.values()))
    assert result["vicreg_variance"] > 0


@pytest.mark.parametrize(("batch", "eps"), [(batch, 1e-5) for batch in BATCH_SIZES]
                         + [(batch, 1e-12) for batch in BATCH_SIZES if batch > 2])
def test_barlow_matches_paper(batch: int, eps: float) -> None:
    """eps=1e-12 is eq. (1) as published, without eps (not with 2 rows: each standardised column is then +-1
    whatever the inputs, so the gradient is of the order of eps and only rounding is left to compare). The paper's
    Algorithm 1 divides by the unbiased std instead, which scales C by (N - 1) / N; eq. (1), the authors' code and
    lightly do not."""
    ours, ref = views(batch), views(batch)
    result = BarlowTwinsLoss(eps=eps)(ours)
    ref_loss = ref_barlow(*ref.values(), eps=eps)
    assert_matches(result["loss"], ref_loss, list(ours.values()), list(ref.values()))


def test_terms_make_the_loss() -> None:
    out = views(16)
    vicreg = VICRegLoss(2.0, 3.0, 4.0)(out)
    assert set(vicreg) == {"loss", "vicreg_loss", "vicreg_invariance", "vicreg_variance", "vicreg_covariance"}
    torch.testing.assert_close(vicreg["vicreg_loss"], 2.0 * vicreg["vicreg_invariance"]
                               + 3.0 * vicreg["vicreg_variance"] + 4.0 * vicreg["vicreg_covariance"])
    barlow = BarlowTwinsLoss(0.25)(out)
    assert set(barlow) == {"loss", "barlow_loss", "barlow_on_diagonal", "barlow_off_diagonal"}
    torch.testing.assert_close(barlow["barlow_loss"],
                               barlow["barlow_on_diagonal"] + 0.25 * barlow["barlow_off_diagonal"])
    assert all(not v.requires_grad for k, v in {**vicreg, **barlow}.items() if k != "loss")
    assert VICRegLoss().metrics == ("vicreg_invariance", "vicreg_variance")
    assert BarlowTwinsLoss(name="bt").metrics == ("bt_on_diagonal", "bt_off_diagonal")
    assert VICRegLoss.inputs == BarlowTwinsLoss.inputs == ("aug1", "aug2")


def test_aligned_decorrelated_views_give_zero_loss() -> None:
    """Equal views whose dimensions are uncorrelated, with std above 1: no term is active (Barlow Twins' C_ii
    falls short of 1 by its eps only)."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    z = hadamard[:, 1:5] * 1.5  # 8 rows; zero-mean orthogonal columns
    out = {"aug1_embed": z, "aug2_embed": z.clone()}
    assert VICRegLoss()(out)["loss"].item() == pytest.approx(0.0, abs=1e-12)
    barlow = BarlowTwinsLoss()(out)
    assert barlow["barlow_off_diagonal"].item() == pytest.approx(0.0, abs=1e-24)
    assert barlow["barlow_on_diagonal"].item() == pytest.approx(4 * (1e-5 / (1.5 ** 2 + 1e-5)) ** 2, rel=1e-6)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_batch_of_two_is_finite(name: str, dtype: torch.dtype) -> None:
    out = views(2, dtype=dtype)
    result = OBJECTIVES[name]()(out)
    assert all(torch.isfinite(v) and v.dtype == dtype for v in result.values())
    result["loss"].backward()
    assert all(torch.isfinite(out[key].grad).all() for key in VIEWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_samples_give_finite_loss_and_gradients(dtype: torch.dtype) -> None:
    """Every sample the same (complete collapse): the eps terms keep everything finite."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(2, 1, DIM, generator=gen, dtype=torch.float64)
    out = {key: rows[i].expand(8, DIM).to(dtype).clone().requires_grad_() for i, key in enumerate(VIEWS)}
    for objective in (VICRegLoss(), BarlowTwinsLoss()):
        result = objective(out)
        assert all(torch.isfinite(v) for v in result.values())
        grads = torch.autograd.grad(result["loss"], [out[key] for key in VIEWS])
        assert all(torch.isfinite(g).all() for g in grads)
    vicreg, barlow = VICRegLoss()(out), BarlowTwinsLoss()(out)
    assert vicreg["vicreg_variance"].item() == pytest.approx(2 * (1 - 1e-4 ** 0.5), rel=1e-5)
    assert vicreg["vicreg_covariance"].item() == pytest.approx(0.0, abs=1e-10)
    assert vicreg["vicreg_invariance"].item() == pytest.approx(((rows[0] - rows[1]) ** 2).mean().item(), rel=1e-5)
    assert barlow["barlow_on_diagonal"].item() == pytest.approx(DIM, rel=1e-5)
    assert barlow["barlow_off_diagonal"].item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_batch_of_one_raises(name: str) -> None:
    with pytest.raises(ValueError, match="global batch of at least 2 rows"):
        OBJECTIVES[name]()(views(1))


@pytest.mark.parametrize(
    ("make", "kwarg", "bad"),
    [(VICRegLoss, kwarg, bad) for kwarg in ("sim_coeff", "var_coeff", "cov_coeff")
     for bad in (-1.0, float("nan"), float("inf"))]
    + [(VICRegLoss, kwarg, bad) for kwarg in ("eps", "std_target") for bad in (0.0, -1e-4, float("nan"), "x")]
    + [(BarlowTwinsLoss, "lambd", bad) for bad in (-5e-3, float("nan"), float("-inf"), None)]
    + [(BarlowTwinsLoss, "eps", bad) for bad in (0.0, -1.0, float("inf"))],
)
def test_bad_hyper_parameters_raise_one_line_naming_them(make: type[Objective], kwarg: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"{make.__name__} {kwarg} must be") as info:
        make(**{kwarg: bad})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_missing_and_mismatched_views_raise(name: str) -> None:
    out = views(4)
    with pytest.raises(MissingOutputError, match="aug2_embed"):
        OBJECTIVES[name]()({"aug1_embed": out["aug1_embed"]})
    with pytest.raises(ValueError, match="aug1_embed and aug2_embed"):
        OBJECTIVES[name]()({"aug1_embed": out["aug1_embed"], "aug2_embed": out["aug2_embed"][:3]})


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_results(name: str, dtype: torch.dtype) -> None:
    low = views(8, dtype=dtype)
    result = OBJECTIVES[name]()(low)
    assert all(v.dtype == torch.float32 for v in result.values())
    upcast = {k: v.detach().float() for k, v in low.items()}
    torch.testing.assert_close(result["loss"].detach(), OBJECTIVES[name]()(upcast)["loss"], rtol=1e-6, atol=0.0)
    result["loss"].backward()
    assert low["aug1_embed"].grad.dtype == dtype


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_autocast_does_not_lower_precision(name: str) -> None:
    out = views(8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = OBJECTIVES[name]()(out)
    assert result["loss"].dtype == torch.float32
    torch.testing.assert_close(result["loss"].detach(), OBJECTIVES[name]()(out)["loss"].detach(), rtol=1e-6, atol=0.0)


def test_composes_with_clip() -> None:
    gen = torch.Generator().manual_seed(5)
    out = {**views(6, dtype=torch.float32), "image_embed": torch.randn(6, 8, generator=gen),
           "text_embed": torch.randn(6, 8, generator=gen), "logit_scale": torch.tensor(10.0)}
    combined = ComposedObjective({"clip": Term(CLIPLoss()), "vicreg": Term(VICRegLoss(), 0.1),
                                  "barlow": {"objective": BarlowTwinsLoss(), "weight": 0.2}})
    assert combined.inputs == ("image", "text", "aug1", "aug2")
    result = combined(out)
    expected = result["clip_loss"] + 0.1 * result["vicreg_loss"] + 0.2 * result["barlow_loss"]
    torch.testing.assert_close(result["loss"].detach(), expected, rtol=1e-6, atol=0.0)
    assert combined.metrics == ("clip_acc", "vicreg_invariance", "vicreg_variance", "barlow_on_diagonal",
                                "barlow_off_diagonal")


# ---------------------------------------------------------------- two real processes

WORLD_SIZE, LOCAL_BATCH = 2, 4


def global_views() -> dict[str, Tensor]:
    """The same seeded float64 global batch in every process."""
    return {k: v.detach() for k, v in views(WORLD_SIZE * LOCAL_BATCH, dim=12, seed=11).items()}


def run_objective(objective: Objective, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every result entry and the gradients of both views, from leaf copies of `outputs`."""
    inputs = leaves(outputs)
    result = objective(inputs)
    result["loss"].backward()
    return {**{k: v.detach() for k, v in result.items()}, **{key: inputs[key].grad for key in VIEWS}}


def _worker(rank: int, port: int) -> dict:
    """One rank: both objectives on its rows of the global batch."""
    with gloo_world(rank, port, WORLD_SIZE) as world:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {k: v[rows] for k, v in global_views().items()}
        results = {name: run_objective(make(gather=make_gather(world)), local) for name, make in OBJECTIVES.items()}
    return results


rank_results = ranks_fixture(_worker, WORLD_SIZE, timeout=120)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_ranks_match_single_process(rank_results: list[dict], name: str) -> None:
    """As in test_distributed: the mean of the ranks' losses is the one-process loss, and the ranks' gradients,
    averaged as DDP does (divided by the world size), are its gradients. Here every rank's loss and terms are the
    global ones."""
    single = run_objective(OBJECTIVES[name](), global_views())
    ranks = [r[name] for r in rank_results]
    assert single["loss"].dtype == torch.float64
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD_SIZE, single["loss"], rtol=1e-12, atol=0.0)
    for r in ranks:
        for key in single.keys() - set(VIEWS):
            torch.testing.assert_close(r[key], single[key], rtol=1e-12, atol=1e-15)
    for key in VIEWS:
        rank_rows = torch.cat([r[key] for r in ranks]) / WORLD_SIZE
        torch.testing.assert_close(rank_rows, single[key], rtol=0.0, atol=1e-12 * single[key].abs().max().item())
