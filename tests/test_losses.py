"""Objectives against naive float64 references, plus symmetry, edge cases and composition."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from slip.losses import (
    CLIPLoss,
    ComposedObjective,
    MissingOutputError,
    Objective,
    SigLIPLoss,
    SimCLRLoss,
    SLIPLoss,
    Term,
)

BATCH_SIZES = [1, 2, 3, 17, 128, 512]
LOGIT_SCALES = [1 / 0.07, 100.0]
EMBED_DIM, SSL_DIM = 64, 32


# ---------------------------------------------------------------- naive float64 references
#
# Written with explicit formulas (no matmul, cross_entropy or masking tricks) to stay independent of
# the code under test. Scalars (logit scale, bias) are passed as one copy per logit, so the test can read each logit's
# contribution to the scalar's gradient: their sum is the gradient, their absolute sum its error scale.


def _normalize(x: Tensor) -> Tensor:
    return x / x.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)


def _logsumexp_rows(values: Tensor) -> Tensor:
    top = values.max(dim=-1, keepdim=True).values
    return (top + (values - top).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)


def _log_sigmoid(x: Tensor) -> Tensor:
    return torch.clamp(x, max=0) - torch.log1p(torch.exp(-x.abs()))


def _cosines(a: Tensor, b: Tensor) -> Tensor:
    return torch.einsum("id,jd->ij", _normalize(a), _normalize(b))


def ref_clip(image: Tensor, text: Tensor, scales: Tensor) -> Tensor:
    """Per row: -log softmax of the matching column, in both directions; scales is [2, n, n]."""
    per_image = scales[0] * _cosines(image, text)
    per_text = scales[1] * _cosines(text, image)
    rows = (_logsumexp_rows(per_image) - per_image.diagonal()) + (_logsumexp_rows(per_text) - per_text.diagonal())
    return rows.sum() / (2 * image.shape[0])


def ref_simclr(aug1: Tensor, aug2: Tensor, temperature: float) -> Tensor:
    """Row i's candidates: all rows of the other view, then the rows j != i of its own view."""
    n = aug1.shape[0]
    others = torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long).view(n, n - 1)
    total = aug1.new_zeros(())
    for own, other in ((aug1, aug2), (aug2, aug1)):
        cross = _cosines(own, other) / temperature
        same = (_cosines(own, own) / temperature).gather(1, others)
        candidates = torch.cat([cross, same], dim=1)
        total = total + (_logsumexp_rows(candidates) - cross.diagonal()).sum()
    return total / (2 * n)


def ref_siglip(image: Tensor, text: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    """Sum over all (image, text) pairs of -log sigmoid(+logit) for matches, -log sigmoid(-logit) otherwise."""
    n = image.shape[0]
    logits = scales * _cosines(image, text) + biases
    signs = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -_log_sigmoid(signs * logits).sum() / n


# ---------------------------------------------------------------- helpers


def make_outputs(batch: int, scale: float, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random leaf tensors shaped like a model's outputs, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "image_embed": torch.randn(batch, EMBED_DIM, generator=gen),
        "text_embed": torch.randn(batch, EMBED_DIM, generator=gen),
        "aug1_embed": torch.randn(batch, SSL_DIM, generator=gen),
        "aug2_embed": torch.randn(batch, SSL_DIM, generator=gen),
        "logit_scale": torch.tensor(scale),
    }
    return {k: v.to(dtype).requires_grad_() for k, v in outputs.items()}


def as_float64(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent float64 leaf copies."""
    return {k: v.detach().double().requires_grad_() for k, v in outputs.items()}


def per_logit(value: Tensor | float, *shape: int) -> Tensor:
    """A float64 leaf holding one copy of a scalar per logit."""
    return torch.full(shape, float(value), dtype=torch.float64, requires_grad=True)


def grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def assert_matches(value: Tensor, ref_value: Tensor, got: list[Tensor], want: list[Tensor], n_scalars: int = 0) -> None:
    """Compare loss and gradients with the float64 reference; the last `n_scalars` of `want` are per-logit.

    Loss: 1e-5 relative. Embedding gradients: 1e-5 relative plus 1e-5 of the largest entry.
    A scalar's gradient is a sum of signed per-logit terms that can cancel far below their own size,
    and float32 cannot do better than ~1e-7 of the terms, so it gets 1e-5 relative plus 1e-5 of the
    absolute sum of the terms.
    """
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value.detach(), rtol=1e-5, atol=0.0)
    split = len(got) - n_scalars
    for g, r in zip(got[:split], want[:split], strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
    for g, terms in zip(got[split:], want[split:], strict=True):
        assert g.dim() == 0 and torch.isfinite(g)
        torch.testing.assert_close(g.double(), terms.sum(), rtol=1e-5, atol=1e-5 * terms.abs().sum().item())


# ---------------------------------------------------------------- value and gradients vs reference


@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_clip_matches_reference(batch: int, scale: float) -> None:
    out = make_outputs(batch, scale)
    ref = as_float64(out)
    ref_scales = per_logit(scale, 2, batch, batch)
    result = CLIPLoss()(out)
    ref_loss = ref_clip(ref["image_embed"], ref["text_embed"], ref_scales)
    assert_matches(
        result["loss"],
        ref_loss,
        grads(result["loss"], [out["image_embed"], out["text_embed"], out["logit_scale"]]),
        grads(ref_loss, [ref["image_embed"], ref["text_embed"], ref_scales]),
        n_scalars=1,
    )
    assert torch.equal(result["clip_loss"], result["loss"].detach())


@pytest.mark.parametrize("temperature", [0.1, 0.05])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_simclr_matches_reference(batch: int, temperature: float) -> None:
    out = make_outputs(batch, 1.0)
    ref = as_float64(out)
    result = SimCLRLoss(temperature)(out)
    ref_loss = ref_simclr(ref["aug1_embed"], ref["aug2_embed"], temperature)
    assert_matches(
        result["loss"],
        ref_loss,
        grads(result["loss"], [out["aug1_embed"], out["aug2_embed"]]),
        grads(ref_loss, [ref["aug1_embed"], ref["aug2_embed"]]),
    )


@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_siglip_matches_reference(batch: int, scale: float) -> None:
    out = make_outputs(batch, scale)
    ref = as_float64(out)
    objective = SigLIPLoss(init_logit_bias=-10.0)
    ref_scales, ref_biases = per_logit(scale, batch, batch), per_logit(-10.0, batch, batch)
    result = objective(out)
    ref_loss = ref_siglip(ref["image_embed"], ref["text_embed"], ref_scales, ref_biases)
    assert_matches(
        result["loss"],
        ref_loss,
        grads(result["loss"], [out["image_embed"], out["text_embed"], out["logit_scale"], objective.logit_bias]),
        grads(ref_loss, [ref["image_embed"], ref["text_embed"], ref_scales, ref_biases]),
        n_scalars=2,
    )


@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("batch", [1, 3, 128])
def test_slip_matches_reference(batch: int, scale: float) -> None:
    out = make_outputs(batch, scale)
    ref = as_float64(out)
    ref_scales = per_logit(scale, 2, batch, batch)
    result = SLIPLoss(ssl_scale=0.5, ssl_temperature=0.1)(out)
    ref_loss = ref_clip(ref["image_embed"], ref["text_embed"], ref_scales) + 0.5 * ref_simclr(
        ref["aug1_embed"], ref["aug2_embed"], 0.1
    )
    keys = ["image_embed", "text_embed", "aug1_embed", "aug2_embed"]
    assert_matches(
        result["loss"],
        ref_loss,
        grads(result["loss"], [out[k] for k in keys] + [out["logit_scale"]]),
        grads(ref_loss, [ref[k] for k in keys] + [ref_scales]),
        n_scalars=1,
    )


# ---------------------------------------------------------------- symmetry


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_clip_symmetric_in_image_and_text(batch: int) -> None:
    out = make_outputs(batch, 1 / 0.07)
    swapped = {**out, "image_embed": out["text_embed"], "text_embed": out["image_embed"]}
    torch.testing.assert_close(CLIPLoss()(swapped)["loss"], CLIPLoss()(out)["loss"], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_simclr_symmetric_in_views(batch: int) -> None:
    out = make_outputs(batch, 1.0)
    swapped = {**out, "aug1_embed": out["aug2_embed"], "aug2_embed": out["aug1_embed"]}
    torch.testing.assert_close(SimCLRLoss()(swapped)["loss"], SimCLRLoss()(out)["loss"], rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------- edge cases


ALL_OBJECTIVES = [CLIPLoss, SimCLRLoss, SigLIPLoss, SLIPLoss]


@pytest.mark.parametrize("make", ALL_OBJECTIVES)
def test_zero_rows_and_max_scale_stay_finite(make: type[Objective]) -> None:
    out = make_outputs(6, 100.0)
    with torch.no_grad():
        for key in ("image_embed", "text_embed", "aug1_embed", "aug2_embed"):
            out[key][::2] = 0.0
    objective = make()
    result = objective(out)
    assert all(torch.isfinite(v).all() for v in result.values())
    leaves = [out[k] for k in ("image_embed", "text_embed", "aug1_embed", "aug2_embed", "logit_scale")]
    result["loss"].backward()
    for t in leaves + list(objective.parameters()):
        assert t.grad is None or torch.isfinite(t.grad).all()


@pytest.mark.parametrize("make", ALL_OBJECTIVES)
def test_batch_of_one(make: type[Objective]) -> None:
    out = make_outputs(1, 1 / 0.07)
    result = make()(out)
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    assert torch.isfinite(out["image_embed"].grad if make is not SimCLRLoss else out["aug1_embed"].grad).all()


def test_aligned_embeddings_give_full_accuracy_and_low_loss() -> None:
    batch = 8
    basis = torch.eye(batch, EMBED_DIM) * 3.0  # orthogonal rows; the scale must not matter
    out = {
        "image_embed": basis,
        "text_embed": basis.clone(),
        "aug1_embed": basis.clone(),
        "aug2_embed": basis.clone(),
        "logit_scale": torch.tensor(100.0),
    }
    clip, ssl, siglip = CLIPLoss()(out), SimCLRLoss(0.1)(out), SigLIPLoss()(out)
    assert clip["clip_acc"].item() == ssl["ssl_acc"].item() == siglip["siglip_acc"].item() == 100.0
    assert clip["loss"].item() < 1e-6
    # Positive logit 1/0.1 = 10 against 2 * batch - 2 negatives at 0.
    assert ssl["loss"].item() == pytest.approx(math.log1p((2 * batch - 2) * math.exp(-10)), rel=1e-4)
    # Matches at 100 - 10, the other batch - 1 pairs per row at -10.
    assert siglip["loss"].item() == pytest.approx((batch - 1) * math.log1p(math.exp(-10)), rel=1e-4)


def test_random_embeddings_have_chance_level_loss() -> None:
    out = make_outputs(256, 1.0)
    assert CLIPLoss()(out)["loss"].item() == pytest.approx(math.log(256), rel=0.01)


def test_siglip_reports_the_bias_its_forward_used() -> None:
    objective = SigLIPLoss(init_logit_bias=-3.25)
    result = objective(make_outputs(4, 10.0))
    with torch.no_grad():
        objective.logit_bias.add_(1.0)  # an optimizer step after the forward leaves the reported value as it was
    assert result["logit_bias"].dtype == torch.float32 and not result["logit_bias"].requires_grad
    assert result["logit_bias"].item() == -3.25


def test_slip_is_clip_plus_scaled_ssl_exactly() -> None:
    out = make_outputs(16, 1 / 0.07)
    result = SLIPLoss(ssl_scale=0.3)(out)
    assert set(result) == {"loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc"}
    assert torch.equal(result["loss"].detach(), result["clip_loss"] + 0.3 * result["ssl_loss"])
    assert SLIPLoss().inputs == ("image", "text", "aug1", "aug2")


def test_inputs_of_leaves() -> None:
    assert CLIPLoss.inputs == SigLIPLoss.inputs == ("image", "text")
    assert SimCLRLoss.inputs == ("aug1", "aug2")


def test_a_composition_with_a_third_objective() -> None:
    out = make_outputs(12, 1 / 0.07)
    parts = {"ssl": SimCLRLoss(0.2), "clip": CLIPLoss(), "sig": SigLIPLoss(-5.0)}
    weights = {"clip": 1.0, "ssl": 0.5, "sig": 2.0}
    combined = ComposedObjective({name: Term(part, weights[name]) for name, part in parts.items()})
    assert combined.inputs == ("image", "text", "aug1", "aug2")
    assert [p for p in combined.parameters()] == [parts["sig"].logit_bias]
    result = combined(out)
    assert set(result) == {"loss", "ssl_loss", "ssl_acc", "clip_loss", "clip_acc", "sig_loss", "sig_acc",
                           "logit_bias"}
    assert torch.equal(result["logit_bias"], parts["sig"].logit_bias.detach())
    expected = 0.5 * result["ssl_loss"] + 1.0 * result["clip_loss"] + 2.0 * result["sig_loss"]
    torch.testing.assert_close(result["loss"].detach(), expected, rtol=1e-6, atol=0.0)
    result["loss"].backward()
    assert parts["sig"].logit_bias.grad is not None


def test_set_gather_reaches_children() -> None:
    calls: list[int] = []

    def counting_gather(t: Tensor) -> tuple[Tensor, int]:
        calls.append(t.shape[0])
        return t, 0

    out = make_outputs(4, 10.0)
    plain = SLIPLoss()(out)["loss"]
    slip = SLIPLoss()
    slip.set_gather(counting_gather)
    assert torch.equal(slip(out)["loss"], plain)
    assert calls == [4, 4, 4, 4]  # image, text, aug1, aug2
    calls.clear()
    SLIPLoss(gather=counting_gather)(out)
    assert len(calls) == 4


def test_result_key_collisions_raise() -> None:
    twice = ComposedObjective({"a": Term(SigLIPLoss()), "b": Term(SigLIPLoss())})  # both report logit_bias
    with pytest.raises(ValueError, match=r"^ComposedObjective: term 'b' returns 'logit_bias', already set"):
        twice(make_outputs(3, 1.0))


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperature_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SimCLRLoss(bad)


def test_missing_key_names_key_and_objective() -> None:
    out = make_outputs(2, 1.0)
    del out["aug2_embed"]
    with pytest.raises(KeyError) as info:
        SLIPLoss()(out)
    message = str(info.value)
    assert "aug2_embed" in message and "SimCLRLoss" in message and "\n" not in message
    assert isinstance(info.value, MissingOutputError)


def test_mismatched_batch_raises() -> None:
    out = make_outputs(4, 1.0)
    out["text_embed"] = out["text_embed"][:3]
    with pytest.raises(ValueError, match="text_embed"):
        CLIPLoss()(out)


@pytest.mark.parametrize("make", ALL_OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_loss(make: type[Objective], dtype: torch.dtype) -> None:
    low = make_outputs(8, 1 / 0.07, dtype=dtype)
    result = make()(low)
    assert all(v.dtype == torch.float32 for v in result.values())
    # Upcasting happens before any maths, so the result equals the float32 loss on upcast inputs.
    upcast = {k: v.detach().float() for k, v in low.items()}
    torch.testing.assert_close(result["loss"].detach(), make()(upcast)["loss"], rtol=1e-6, atol=0.0)
    result["loss"].backward()
    assert low["logit_scale"].grad is None or low["logit_scale"].grad.dtype == dtype


@pytest.mark.parametrize("make", ALL_OBJECTIVES)
def test_autocast_does_not_lower_precision(make: type[Objective]) -> None:
    out = make_outputs(8, 1 / 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = make()(out)
    assert result["loss"].dtype == torch.float32
    torch.testing.assert_close(result["loss"].detach(), make()(out)["loss"].detach(), rtol=1e-6, atol=0.0)
