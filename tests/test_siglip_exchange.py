"""SigLIP with the bidirectional neighbour exchange equals the gathered SigLIP, loss and gradients, in float64: on one
process, and on 2 and 3 gloo ranks (one spawned run per world size), where both equal one process on the
concatenated batch, also through exact accumulation."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from slip.distributed import Gather, make_gather
from slip.losses import SigLIPLoss
from slip.siglip_exchange import _BlockLoss, ring_sigmoid_loss
from rank_helpers import gloo_world, run_ranks

LOCAL_BATCH, DIM, SCALE, BIAS = 3, 8, 7.0, -2.0
EXCHANGES = ("gather", "bidirectional")
GRADIENTS = ("image_embed", "text_embed", "logit_scale", "logit_bias")
# Exact accumulation, checked on ACCUMULATION_WORLD ranks only (its import of the model code, timm included, costs
# each spawned rank seconds): MICRO_BATCHES micro-batches of MICRO rows per rank, through linear "towers" of RAW inputs.
ACCUMULATION_WORLD, MICRO_BATCHES, MICRO, RAW = 2, 2, 2, 5


def objective(exchange: str, gather: Gather | None = None) -> SigLIPLoss:
    return SigLIPLoss(init_logit_bias=BIAS, exchange=exchange, gather=gather).double()


def global_outputs(world_size: int) -> dict[str, Tensor]:
    """The same seeded float64 global batch in every process."""
    gen = torch.Generator().manual_seed(world_size)
    rows = world_size * LOCAL_BATCH
    image = torch.randn(rows, DIM, generator=gen, dtype=torch.float64)
    # Texts near their images, so that some but not all images' best text is their own (accuracies in (0, 100)).
    noise = torch.randn(rows, DIM, generator=gen, dtype=torch.float64)
    return {"image_embed": image, "text_embed": image + 1.2 * noise,
            "logit_scale": torch.tensor(SCALE, dtype=torch.float64)}


def run_objective(loss_fn: SigLIPLoss, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss, accuracy and the gradients of the embeddings, the scale and the bias, from leaf copies of `outputs`."""
    leaves = {key: value.detach().clone().requires_grad_() for key, value in outputs.items()}
    result = loss_fn(leaves)
    loss_fn.zero_grad()
    result["loss"].backward()
    return {"loss": result["loss"].detach(), "acc": result["siglip_acc"],
            **{key: leaf.grad for key, leaf in leaves.items()}, "logit_bias": loss_fn.logit_bias.grad.clone()}


def towers() -> nn.ModuleDict:
    """Seeded linear image and text "towers" and a learnable log scale, in float64."""
    torch.manual_seed(0)
    return nn.ModuleDict({"image": nn.Linear(RAW, DIM), "text": nn.Linear(RAW, DIM),
                          "scale": nn.ParameterDict({"log": nn.Parameter(torch.tensor(2.0))})}).double()


def raw_batch(world_size: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(100 + world_size)
    rows = world_size * MICRO_BATCHES * MICRO
    return {key: torch.randn(rows, RAW, generator=gen, dtype=torch.float64) for key in ("image", "text")}


def accumulated_gradients(loss_fn: SigLIPLoss, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients of the towers, scale and bias from `slip.app.accumulation.exact_backward` over micro-batches."""
    from slip.app.accumulation import exact_backward

    model = towers()

    def encode(micro: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"image_embed": model["image"](micro["image"]), "text_embed": model["text"](micro["text"])}

    def finish(features: dict[str, Tensor]) -> dict[str, Tensor]:
        return loss_fn({**features, "logit_scale": model["scale"]["log"].exp()})

    micro_batches = [{key: value.chunk(MICRO_BATCHES)[index] for key, value in batch.items()}
                     for index in range(MICRO_BATCHES)]
    loss_fn.zero_grad()
    exact_backward(micro_batches, encode, finish, lambda loss: loss.backward(), model, torch.device("cpu"))
    return {**{name: p.grad.clone() for name, p in model.named_parameters()}, "logit_bias": loss_fn.logit_bias.grad}


def _worker(rank: int, port: int, world_size: int) -> dict:
    """One rank: its rows of the global batch under both exchanges, directly and through exact accumulation."""
    with gloo_world(rank, port, world_size) as world:
        gathers = []

        def counting_gather(tensor: Tensor) -> tuple[Tensor, int]:
            gathers.append(tensor.shape)
            return make_gather(world)(tensor)

        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {key: (value[rows] if value.dim() else value) for key, value in global_outputs(world_size).items()}
        raw = {key: value.chunk(world_size)[rank] for key, value in raw_batch(world_size).items()}
        results: dict[str, object] = {}
        for exchange in EXCHANGES:
            gathers.clear()
            results[exchange] = run_objective(objective(exchange, counting_gather), local)
            results[f"{exchange}_gathers"] = len(gathers)
            if world_size == ACCUMULATION_WORLD:
                results[f"{exchange}_accumulated"] = accumulated_gradients(objective(exchange, counting_gather), raw)
        with torch.no_grad():  # every rank's chunk scored as the rank it came from: each row's best global column
            image, text = (torch.nn.functional.normalize(local[key], dim=-1) for key in ("image_embed", "text_embed"))
            results["best_text"] = ring_sigmoid_loss(image, text, local["logit_scale"], torch.tensor(BIAS), rank,
                                                     world_size)[1]
        try:  # unequal local batches: every rank raises, none hangs
            objective("bidirectional", counting_gather)({key: value[: LOCAL_BATCH - (rank == 0)] if value.dim() else value
                                                         for key, value in local.items()})
            results["unequal_error"] = ""
        except ValueError as error:
            results["unequal_error"] = str(error)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    """The world size and the results of `_worker` from that many spawned gloo processes."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"siglip-ranks{world_size}")
    return world_size, run_ranks(functools.partial(_worker, world_size=world_size), world_size, out_dir, timeout=120)


def assert_close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- one process


def test_a_bad_exchange_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="exchange must be one of gather, bidirectional, got 'ring'") as info:
        SigLIPLoss(exchange="ring")
    assert "\n" not in str(info.value)


def test_the_config_default_is_the_gathered_exchange() -> None:
    assert SigLIPLoss().exchange == "gather"


def test_one_process_bidirectional_equals_gather_exactly() -> None:
    outputs = global_outputs(2)
    want = run_objective(objective("gather"), outputs)
    got = run_objective(objective("bidirectional"), outputs)
    assert set(got) == set(want) == {"loss", "acc", *GRADIENTS}
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("matched", [True, False], ids=["own-block", "other-block"])
def test_a_blocks_hand_written_backward_passes_gradcheck(matched: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    inputs = tuple(value.requires_grad_() for value in (image, text, torch.tensor(1.7, dtype=torch.float64),
                                                         torch.tensor(-0.6, dtype=torch.float64)))
    assert torch.autograd.gradcheck(lambda *args: _BlockLoss.apply(*args, matched)[0], inputs, fast_mode=True)


# ---------------------------------------------------------------- 2 and 3 gloo ranks


def test_bidirectional_equals_gathered_on_every_rank(ranks: tuple[int, list[dict]]) -> None:
    _, results = ranks
    for result in results:
        for key in ("loss", "acc", *GRADIENTS):
            assert_close(result["bidirectional"][key], result["gather"][key])


def test_both_equal_one_process_on_the_concatenated_batch(ranks: tuple[int, list[dict]]) -> None:
    world_size, results = ranks
    single = run_objective(objective("gather"), global_outputs(world_size))
    for exchange in EXCHANGES:
        per_rank = [result[exchange] for result in results]
        # DDP averages the ranks' gradients, so the one-process values are the means over ranks.
        assert_close(sum(r["loss"] for r in per_rank) / world_size, single["loss"])
        # Accuracies are float32 percentages: the mean over ranks rounds differently.
        torch.testing.assert_close(sum(r["acc"] for r in per_rank) / world_size, single["acc"])
        for key in ("image_embed", "text_embed"):
            assert_close(torch.cat([r[key] for r in per_rank]) / world_size, single[key])
        for key in ("logit_scale", "logit_bias"):
            assert_close(sum(r[key] for r in per_rank) / world_size, single[key])


def test_each_images_best_text_is_the_argmax_over_the_global_batch(ranks: tuple[int, list[dict]]) -> None:
    world_size, results = ranks
    outputs = global_outputs(world_size)
    image, text = (torch.nn.functional.normalize(outputs[key], dim=-1) for key in ("image_embed", "text_embed"))
    want = (SCALE * image @ text.T + BIAS).argmax(dim=1)
    assert torch.equal(torch.cat([result["best_text"] for result in results]), want)


def test_bidirectional_exchanges_without_gathering(ranks: tuple[int, list[dict]]) -> None:
    _, results = ranks
    for result in results:
        assert result["gather_gathers"] > 0 and result["bidirectional_gathers"] == 0


def test_unequal_local_batches_fail_on_every_rank(ranks: tuple[int, list[dict]]) -> None:
    _, results = ranks
    for result in results:
        assert "equal text batches on every rank" in result["unequal_error"]
        assert "\n" not in result["unequal_error"]


def test_exact_accumulation_composes_with_the_bidirectional_exchange(ranks: tuple[int, list[dict]]) -> None:
    world_size, results = ranks
    if world_size != ACCUMULATION_WORLD:
        pytest.skip(f"exact accumulation is checked on {ACCUMULATION_WORLD} ranks")
    model = towers()
    single_loss = objective("gather")
    batch = raw_batch(world_size)
    single_loss({"image_embed": model["image"](batch["image"]), "text_embed": model["text"](batch["text"]),
                 "logit_scale": model["scale"]["log"].exp()})["loss"].backward()
    single = {**{name: p.grad for name, p in model.named_parameters()}, "logit_bias": single_loss.logit_bias.grad}
    for result in results:
        for key in single:
            assert_close(result["bidirectional_accumulated"][key], result["gather_accumulated"][key])
    for key in single:
        assert_close(sum(r["bidirectional_accumulated"][key] for r in results) / world_size, single[key])
