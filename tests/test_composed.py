"""Composed objectives: any weighted terms from config, each reporting under its own name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slip.app.config import ConfigError, build
from slip.app.train import train
from slip.losses import CLIPLoss, ComposedObjective, SigLIPLoss, SimCLRLoss, SLIPLoss, Term
from test_losses import make_outputs
from train_helpers import CONF_DIR, FAST, compose_config

LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))


def loss_and_gradients(objective: torch.nn.Module, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The objective's loss on `outputs` and its gradient w.r.t. every output tensor."""
    loss = objective(outputs)["loss"]
    grads = torch.autograd.grad(loss, list(outputs.values()))
    return loss.detach(), dict(zip(outputs, grads))


@pytest.mark.parametrize("ssl_scale", [1.0, 0.3])
def test_the_composed_preset_is_slip_exactly(ssl_scale: float) -> None:
    composed = build(compose_config("loss=clip_simclr", f"loss.terms.ssl.weight={ssl_scale}").loss, "loss")
    slip = build(compose_config("loss=slip", f"loss.ssl_scale={ssl_scale}").loss, "loss")
    assert isinstance(composed, ComposedObjective) and type(composed) is not SLIPLoss
    outputs = make_outputs(6, 1 / 0.07, dtype=torch.float64)
    loss, grads = loss_and_gradients(composed, outputs)
    want_loss, want_grads = loss_and_gradients(slip, outputs)
    assert torch.equal(loss, want_loss)
    for key, grad in want_grads.items():
        assert torch.equal(grads[key], grad), key
    assert composed.inputs == slip.inputs == ("image", "text", "aug1", "aug2")
    assert composed.metrics == slip.metrics == ("clip_acc", "ssl_acc")


def test_a_composition_is_the_weighted_sum_of_its_terms_computed_alone() -> None:
    outputs = make_outputs(5, 12.0, dtype=torch.float64)
    composed = ComposedObjective({"sig": Term(SigLIPLoss(-3.0), 2.0), "ssl": Term(SimCLRLoss(0.2), 0.5)})
    loss, grads = loss_and_gradients(composed, outputs)
    alone_sig, alone_ssl = SigLIPLoss(-3.0), SimCLRLoss(0.2)
    want = 2.0 * alone_sig(outputs)["loss"] + 0.5 * alone_ssl(outputs)["loss"]
    want_grads = torch.autograd.grad(want, list(outputs.values()))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-15, atol=0)
    for grad, want_grad in zip(grads.values(), want_grads):
        torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-15)


def test_one_kind_of_term_twice_reports_under_each_name() -> None:
    outputs = make_outputs(4, 10.0)
    twice = ComposedObjective({"coarse": {"objective": SimCLRLoss(0.5)}, "fine": {"objective": SimCLRLoss(0.05),
                                                                                  "weight": 0.5}})
    result = twice(outputs)
    assert set(result) == {"loss", "coarse_loss", "coarse_acc", "fine_loss", "fine_acc"}
    assert twice.metrics == ("coarse_acc", "fine_acc") and twice.label() == "coarse+fine"
    assert twice.inputs == ("aug1", "aug2")
    torch.testing.assert_close(result["loss"].detach(), result["coarse_loss"] + 0.5 * result["fine_loss"])


def test_the_inputs_are_the_union_of_the_terms_in_canonical_order() -> None:
    both = ComposedObjective({"s": Term(SimCLRLoss()), "c": Term(CLIPLoss())})
    assert both.inputs == ("image", "text", "aug1", "aug2")


@pytest.mark.parametrize("terms, message", [
    ({}, r"^ComposedObjective needs at least one term$"),
    ({"clip": CLIPLoss()}, r"^term 'clip' must be a Term or a mapping with 'objective'"),
    ({"clip": {"objective": CLIPLoss(), "wieght": 1.0}}, r"^term 'clip' must be a Term or a mapping"),
    ({"clip": {"objective": CLIPLoss(), "weight": float("nan")}},
     r"^term 'clip': a term's weight must be a finite number, got nan$"),
    ({"clip": {"objective": "CLIPLoss"}}, r"^term 'clip': a term's objective must be an Objective, got str$"),
    ({"two words": Term(CLIPLoss())}, r"^ComposedObjective term names must be identifiers, got 'two words'$"),
])
def test_bad_terms_are_named(terms: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ComposedObjective(terms)


@pytest.mark.parametrize("override, message", [
    ("loss.terms.ssl.objective.temprature=0.2",
     r"^loss\.terms\.ssl\.objective\.temprature: unknown key for slip\.losses\.SimCLRLoss"),
    ("loss.terms.ssl.objective.temperature=warm",
     r"^loss\.terms\.ssl\.objective\.temperature: expected float, got 'warm'$"),
    ("loss.terms.ssl.weight=-inf", r"^loss: term 'ssl': a term's weight must be a finite number, got -inf$"),
])
def test_a_bad_term_in_the_config_names_its_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(compose_config("loss=clip_simclr", override.replace("loss.", "+loss." if "temprature" in override
                                                                  else "loss.", 1)).loss, "loss")


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_preset_trains_two_steps(loss: str, tmp_path: Path) -> None:
    # Local crops (multi-crop presets) at a size the tiny 32 px model's 4 px patches divide.
    overrides = [*FAST, f"loss={loss}", "trainer.max_steps=2", "augment.local_crop_size=16"]
    results = train(compose_config(*overrides), tmp_path)
    assert results["finished"] and results["step"] == 2
    objective = build(compose_config(f"loss={loss}").loss, "loss")
    assert results["objective"] == objective.label()
    logged = set(results["history"][-1])
    assert {"loss", *objective.metrics} <= logged
