"""Parameter groups (what gets weight decay) and the warmup-cosine schedule against a plain computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slip.losses import SigLIPLoss
from slip.models import build_vit_model
from slip.optim import WarmupCosine, adamw, param_groups, warmup_cosine


def test_no_weight_decay_on_biases_norms_embeddings_and_scales() -> None:
    model = build_vit_model(image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=4,
                            embed_dim=24, text_width=32, text_layers=2, text_heads=4, context_length=16,
                            ssl_mlp_dim=64, ssl_embed_dim=8)
    objective = SigLIPLoss()
    decay, no_decay = param_groups(model, objective)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    decayed = {id(p) for p in decay["params"]}
    undecayed = {id(p) for p in no_decay["params"]}
    everything = {id(p) for p in [*model.parameters(), *objective.parameters()]}
    assert decayed | undecayed == everything and not decayed & undecayed
    names = dict(model.named_parameters())
    for name in ("logit_scale", "visual.pos_embed", "visual.cls_token", "text.token_embedding.weight",
                 "text.positional_embedding", "visual.blocks.0.norm1.weight", "visual.blocks.0.attn.qkv.bias"):
        assert id(names[name]) in undecayed, name
    for name in ("visual.blocks.0.attn.qkv.weight", "visual.patch_embed.proj.weight", "text_projection",
                 "image_projection"):
        assert id(names[name]) in decayed, name
    assert id(objective.logit_bias) in undecayed


def test_frozen_parameters_are_left_out_and_nothing_trainable_is_an_error() -> None:
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert [len(g["params"]) for g in param_groups(layer)] == [1]
    layer.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(layer)


def slip_cosine_scheduler(base: float, final: float, total: int, warmup: int, start: float) -> np.ndarray:
    """The SLIP repository's cosine_scheduler (per-iteration values), written out with numpy as it is there."""
    warmup_schedule = np.linspace(start, base, warmup)
    iters = np.arange(total - warmup)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize(("total", "warmup"), [(10, 0), (10, 1), (10, 3), (100, 25), (5000, 1000)])
def test_schedule_is_the_slip_repositorys_cosine_scheduler(total: int, warmup: int) -> None:
    base, start, end = 3e-3, 1e-6, 1e-5
    schedule = WarmupCosine(base, total, warmup, start, end)
    expected = slip_cosine_scheduler(base, end, total, warmup, start)
    np.testing.assert_allclose([schedule(step) for step in range(total)], expected, rtol=1e-12, atol=0)
    if warmup > 1:
        assert schedule(warmup - 1) == base  # the last warmup step reaches the base lr, as np.linspace does


def test_schedule_that_is_all_warmup_ends_at_the_base_lr() -> None:
    schedule = WarmupCosine(3e-3, 7, 7, 1e-6, 1e-5)
    np.testing.assert_allclose([schedule(step) for step in range(7)], np.linspace(1e-6, 3e-3, 7), rtol=1e-12)


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop() -> None:
    torch.manual_seed(0)
    model = build_vit_model(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                            embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=8,
                            vocab_size=100)
    plain, fused = copy.deepcopy(model), copy.deepcopy(model)
    optimizers = [adamw(param_groups(m), lr=1e-2, weight_decay=0.1, fused=f) for m, f in ((plain, False), (fused, True))]
    for step in range(5):
        for m, optimizer in zip((plain, fused), optimizers):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_warmup_is_given_in_epochs_and_bad_values_are_refused() -> None:
    assert warmup_cosine(1e-3, total_steps=100, steps_per_epoch=40, warmup_epochs=0.25).warmup_steps == 10
    assert warmup_cosine(1e-3, total_steps=5, steps_per_epoch=40, warmup_epochs=1.0).warmup_steps == 5
    with pytest.raises(ValueError, match="base_lr"):
        WarmupCosine(-1.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(1e-3, 0)


def test_adamw_checks_each_setting_by_name() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["weight_decay"] == 0.1
    for bad, name in (({"lr": -1.0}, "lr"), ({"weight_decay": float("nan")}, "weight_decay"),
                      ({"eps": -1e-8}, "eps"), ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas")):
        with pytest.raises(ValueError, match=rf"^{name} must"):
            adamw(params, **{"lr": 1e-3, "weight_decay": 0.1, **bad})
