"""Parameter groups (what gets weight decay) and the warmup-cosine schedule against a plain computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slip.app.config import build
from slip.losses import SigLIPLoss
from slip.models import build_vit_model
from slip.app.optim import WarmupCosine, adamw, param_groups, warmup_cosine
from train_helpers import CONF_DIR, compose_config

PAPER_PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment" / "paper").glob("*.yaml"))


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


def slip_repository_decays(name: str, param: torch.nn.Parameter) -> bool:
    """The SLIP repository's rule (main.py): no decay where `p.ndim < 2 or 'bias' in n or 'ln' in n or 'bn' in n`."""
    return not (param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name)


def built_for_training(*overrides: str) -> tuple[list[tuple[str, torch.nn.Parameter]], list[set[str]]]:
    """The named trainable parameters of the composed run's model and objective (on the meta device: only names and
    shapes matter), and the names in each group of the optimizer its config builds, as slip.train builds it."""
    cfg = compose_config(*overrides, "optim.fused=false")  # fused AdamW refuses meta tensors; groups are the same
    objective = build(cfg.loss, "loss")
    with torch.device("meta"):
        model = build(cfg.model, "model", inputs=list(objective.inputs))
    optimizer = build(cfg.optim, "optim")([model, objective])
    named = [(n, p) for module in (model, objective) for n, p in module.named_parameters() if p.requires_grad]
    name_of = {id(p): n for n, p in named}
    return named, [{name_of[id(p)] for p in group["params"]} for group in optimizer.param_groups]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_decay_what_the_slip_repository_decays(preset: str) -> None:
    named, (decayed, undecayed) = built_for_training(f"experiment=paper/{preset}")
    assert decayed == {n for n, p in named if slip_repository_decays(n, p)}
    assert undecayed == {n for n, p in named if not slip_repository_decays(n, p)}


@pytest.mark.parametrize("model", ["vit_s16", "vit_b16", "vit_l16"])
def test_by_default_embeddings_are_not_decayed(model: str) -> None:
    named, (decayed, undecayed) = built_for_training(f"model={model}", "loss=slip")
    embeddings = {"visual.pos_embed", "visual.cls_token", "text.token_embedding.weight", "text.positional_embedding"}
    slip_decayed = {n for n, p in named if slip_repository_decays(n, p)}
    assert embeddings <= slip_decayed and decayed == slip_decayed - embeddings
    assert undecayed == {n for n, _ in named} - decayed


def test_decaying_embeddings_needs_parameter_names() -> None:
    modules = torch.nn.ModuleDict({"token_embedding": torch.nn.Embedding(5, 3), "proj": torch.nn.Linear(3, 2)})
    for decay_embeddings, decayed in ((False, [modules.proj.weight]),
                                      (True, [modules.token_embedding.weight, modules.proj.weight])):
        decay, no_decay = adamw([modules], lr=1e-3, weight_decay=0.1, decay_embeddings=decay_embeddings).param_groups
        assert decay["params"] == decayed and no_decay["weight_decay"] == 0.0
        assert len(no_decay["params"]) == 3 - len(decayed)
    with pytest.raises(ValueError, match="^decay_embeddings needs the modules"):
        adamw(modules.parameters(), lr=1e-3, weight_decay=0.1, decay_embeddings=True)


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


def test_warmup_is_given_in_steps_or_as_a_fraction_of_the_run_instead() -> None:
    steps = warmup_cosine(1e-3, total_steps=100, steps_per_epoch=40, warmup_epochs=None, warmup_steps=7)
    assert steps.warmup_steps == 7 and steps(6) == pytest.approx(1e-3) and steps(0) == pytest.approx(1e-6)
    share = warmup_cosine(1e-3, total_steps=100, steps_per_epoch=40, warmup_epochs=None, warmup_fraction=0.1)
    assert share.warmup_steps == 10


@pytest.mark.parametrize(("overrides", "message"), [
    (["schedule.warmup_steps=7"], r"^schedule\.warmup_steps: set exactly one of schedule\.warmup_epochs, "
                                  r"warmup_steps and warmup_fraction \(set: warmup_epochs=0\.25, warmup_steps=7\); "
                                  r"e\.g\. add schedule\.warmup_epochs=null$"),
    (["schedule.warmup_epochs=null"], r"^schedule\.warmup_epochs: set exactly one .* \(set: none\)$"),
    (["schedule.warmup_epochs=null", "schedule.warmup_fraction=1.5"], r"^schedule\.warmup_fraction must be"),
    (["schedule.warmup_epochs=null", "schedule.warmup_steps=101"], r"^schedule\.warmup_steps: 101 is more than"),
])
def test_a_warmup_set_twice_none_or_out_of_range_stops_in_one_line_naming_the_key(overrides: list[str],
                                                                                  message: str) -> None:
    from slip.app.config import ConfigError

    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message) as info:
        build(cfg.schedule, "schedule")(total_steps=100, steps_per_epoch=40)
    assert "\n" not in str(info.value)


def test_the_shipped_schedule_takes_warmup_steps_from_the_command_line() -> None:
    cfg = compose_config("schedule.warmup_steps=12", "schedule.warmup_epochs=null")
    assert build(cfg.schedule, "schedule")(total_steps=100, steps_per_epoch=40).warmup_steps == 12


def test_adamw_checks_each_setting_by_name() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["weight_decay"] == 0.1
    for bad, name in (({"lr": -1.0}, "lr"), ({"weight_decay": float("nan")}, "weight_decay"),
                      ({"eps": -1e-8}, "eps"), ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas")):
        with pytest.raises(ValueError, match=rf"^{name} must"):
            adamw(params, **{"lr": 1e-3, "weight_decay": 0.1, **bad})
