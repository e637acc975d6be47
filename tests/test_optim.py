"""Parameter groups (what gets weight decay) and the warmup-cosine schedule against a plain computation."""
from __future__ import annotations

import math

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


@pytest.mark.parametrize(("total", "warmup"), [(10, 0), (10, 3), (7, 7), (100, 25)])
def test_schedule_is_linear_warmup_then_cosine_to_the_end_lr(total: int, warmup: int) -> None:
    base, start, end = 3e-3, 1e-6, 1e-5
    schedule = WarmupCosine(base, total, warmup, start, end)
    for step in range(total):
        if step < warmup:
            expected = start + (base - start) * step / warmup
        else:
            expected = end + (base - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
        assert schedule(step) == pytest.approx(expected, rel=1e-12), step
    if warmup < total:
        assert schedule(warmup) == pytest.approx(base)


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
