"""WorldInfo parsing, and objectives on two real gloo processes against the single-process result."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from slip.distributed import (WorldInfo, all_gather_with_grad, convert_sync_batchnorm, first_host, init_process_group,
                              leave_process_group, local_gather, make_gather, rendezvous_env)
from slip.losses import CLIPLoss, Objective, SigLIPLoss, SimCLRLoss, SLIPLoss
from rank_helpers import run_ranks

# ---------------------------------------------------------------- WorldInfo


def test_world_defaults_to_single_process() -> None:
    world = WorldInfo.from_env({})
    assert world == WorldInfo(rank=0, world_size=1, local_rank=0)
    assert world.is_main and not world.is_distributed


def test_world_from_torchrun() -> None:
    world = WorldInfo.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert world == WorldInfo(rank=5, world_size=8, local_rank=1)
    assert not world.is_main and world.is_distributed


def test_world_from_slurm() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}
    assert WorldInfo.from_env(env) == WorldInfo(rank=0, world_size=4, local_rank=0)


def test_torchrun_takes_precedence_over_slurm() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert WorldInfo.from_env(env) == WorldInfo(rank=1, world_size=2, local_rank=1)


def test_world_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert WorldInfo.from_env() == WorldInfo(rank=2, world_size=3, local_rank=0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2.0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "", "SLURM_LOCALID": "0"}, "SLURM_NTASKS"),
    ],
)
def test_world_rejects_bad_values(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named) as info:
        WorldInfo.from_env(env)
    assert "\n" not in str(info.value)


def test_world_validates_direct_construction() -> None:
    with pytest.raises(ValueError, match="rank"):
        WorldInfo(rank=3, world_size=2)


def test_single_process_gather_is_identity() -> None:
    t = torch.randn(3, 4)
    assert make_gather(WorldInfo()) is local_gather
    gathered, offset = local_gather(t)
    assert gathered is t and offset == 0


def test_all_gather_without_process_group_raises() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        all_gather_with_grad(torch.zeros(2, 3))


# ---------------------------------------------------------------- two real processes

WORLD_SIZE, LOCAL_BATCH, DIM = 2, 5, 16
SCALE = 1 / 0.07
OBJECTIVES: dict[str, type[Objective]] = {
    "clip": CLIPLoss,
    "simclr": SimCLRLoss,
    "slip": SLIPLoss,
    "siglip": SigLIPLoss,
}
EMBED_KEYS = ("image_embed", "text_embed", "aug1_embed", "aug2_embed")


def global_outputs() -> dict[str, Tensor]:
    """The same seeded global batch in every process."""
    gen = torch.Generator().manual_seed(1234)
    n = WORLD_SIZE * LOCAL_BATCH
    outputs = {key: torch.randn(n, DIM, generator=gen) for key in EMBED_KEYS}
    outputs["logit_scale"] = torch.tensor(SCALE)
    return outputs


def run_objective(objective: Objective, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss and the gradients of every input and parameter, from leaf copies of `outputs`."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in outputs.items()}
    loss = objective(leaves)["loss"]
    objective.zero_grad()
    loss.backward()
    result = {"loss": loss.detach()}
    for key, leaf in leaves.items():
        result[key] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    for name, param in objective.named_parameters():
        result[name] = param.grad.clone()
    return result


def batchnorm() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm1d(DIM)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    return torch.nn.Sequential(layer).train()


def batchnorm_results(module: torch.nn.Module, rows: slice) -> dict[str, Tensor]:
    """Output, input gradient and running statistics of a batch norm on `rows` of a fixed global batch."""
    gen = torch.Generator().manual_seed(7)
    x_all = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen) * 3 + 1
    weights = torch.randn(WORLD_SIZE * LOCAL_BATCH, DIM, generator=gen)
    x = x_all[rows].clone().requires_grad_()
    y = module(x)
    (y * weights[rows]).sum().backward()
    return {"bn_out": y.detach(), "bn_grad": x.grad, "bn_mean": module[0].running_mean.clone(),
            "bn_var": module[0].running_var.clone()}


def _worker(rank: int, port: int) -> dict:
    """One rank: run every objective on its half of the global batch; its results."""
    torch.set_num_threads(1)
    world = WorldInfo(rank=rank, world_size=WORLD_SIZE, local_rank=rank)
    init_process_group(world, backend="gloo", init_method=f"tcp://127.0.0.1:{port}")
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = {k: (v[rows] if v.dim() else v) for k, v in global_outputs().items()}
    results: dict[str, object] = {}
    for name, make in OBJECTIVES.items():
        results[name] = run_objective(make(gather=make_gather(world)), local)

    # d/dx of sum_r <w_r, gather(x)> is sum_r w_r[this rank's rows].
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = torch.arange(WORLD_SIZE * 6, dtype=torch.float32).view(WORLD_SIZE * 2, 3) * (rank + 1)
    gathered = all_gather_with_grad(x)
    (gathered * weights).sum().backward()
    results["gathered"] = gathered.detach()
    results["gather_grad"] = x.grad

    results.update(batchnorm_results(convert_sync_batchnorm(batchnorm()), rows))

    try:
        all_gather_with_grad(torch.zeros(3 + rank, 4))
        results["unequal_error"] = ""
    except ValueError as error:
        results["unequal_error"] = str(error)
    leave_process_group(world)
    results["left_group"] = not dist.is_initialized()
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Results of `_worker` from two spawned gloo processes."""
    return run_ranks(_worker, WORLD_SIZE, tmp_path_factory.mktemp("ranks"), timeout=120)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_ranks_match_single_process(rank_results: list[dict], name: str) -> None:
    single = run_objective(OBJECTIVES[name](), global_outputs())
    ranks = [r[name] for r in rank_results]
    mean_loss = sum(r["loss"] for r in ranks) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-6, atol=0.0)
    for key in EMBED_KEYS:
        # DDP averages gradients over ranks, hence the division by the world size.
        rank_rows = torch.cat([r[key] for r in ranks]) / WORLD_SIZE
        torch.testing.assert_close(rank_rows, single[key], rtol=1e-5, atol=1e-6 * single[key].abs().max().item())
    for key in ["logit_scale"] + [k for k in single if k.startswith("logit_bias")]:
        mean_grad = sum(r[key] for r in ranks) / WORLD_SIZE
        torch.testing.assert_close(mean_grad, single[key], rtol=1e-5, atol=1e-7)
    assert (single["logit_scale"] != 0) == (name != "simclr")


def test_all_gather_forward_and_backward(rank_results: list[dict]) -> None:
    expected = torch.cat([torch.full((2, 3), float(rank + 1)) for rank in range(WORLD_SIZE)])
    weights = torch.arange(WORLD_SIZE * 6, dtype=torch.float32).view(WORLD_SIZE * 2, 3)
    summed = sum(weights * (rank + 1) for rank in range(WORLD_SIZE))
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result["gathered"], expected, rtol=0, atol=0)
        torch.testing.assert_close(result["gather_grad"], summed[rank * 2 : (rank + 1) * 2], rtol=0, atol=0)


def test_all_gather_rejects_unequal_batches_on_every_rank(rank_results: list[dict]) -> None:
    for result in rank_results:
        assert "same shape on every rank" in result["unequal_error"]
        assert "(3, 4)" in result["unequal_error"] and "(4, 4)" in result["unequal_error"]


# ---------------------------------------------------------------- SLURM rendezvous


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu[003-005,010],cpu01", "gpu003"), ("node17", "node17"), ("a-b[1,2]", "a-b1"), ("x[7]", "x7")],
)
def test_first_host_of_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_rendezvous_prefers_explicit_address_then_slurm() -> None:
    assert rendezvous_env({"MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {"MASTER_ADDR": "h", "MASTER_PORT": "1"}
    derived = rendezvous_env({"SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert derived == {"MASTER_ADDR": "gpu12", "MASTER_PORT": str(15000 + 4242)}
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        rendezvous_env({})


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(rank_results: list[dict]) -> None:
    single = batchnorm_results(batchnorm(), slice(None))
    for key in ("bn_out", "bn_grad"):
        torch.testing.assert_close(torch.cat([r[key] for r in rank_results]), single[key], rtol=1e-5, atol=1e-5)
    for result in rank_results:
        torch.testing.assert_close(result["bn_mean"], single["bn_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["bn_var"], single["bn_var"], rtol=1e-5, atol=1e-6)


def test_every_rank_leaves_the_process_group(rank_results: list[dict]) -> None:
    assert all(result["left_group"] for result in rank_results)
    leave_process_group(WorldInfo())  # one process, no group: nothing to leave


def test_converting_to_sync_batchnorm_keeps_the_tensors_an_optimizer_already_holds() -> None:
    """slip.train builds the optimizer before it converts the SSL head for several ranks: the converted layers must
    hold the same parameter objects, or their weights would silently never train."""
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), batchnorm()[0]).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    tensors = {name: id(value) for name, value in [*model.named_parameters(), *model.named_buffers()]}
    convert_sync_batchnorm(model)
    assert type(model[1]).__name__ == "SyncBatchNorm1d" and model[1].training
    assert {name: id(value) for name, value in [*model.named_parameters(), *model.named_buffers()]} == tensors
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    model(torch.randn(6, DIM, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before["1.weight"]) and model[1].weight.dtype == torch.float64
