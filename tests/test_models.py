"""Models: every registered builder, parts built per objective, and fast paths equal to the plain paths."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from slip.models import (
    ALL_INPUTS,
    MODEL_BUILDERS,
    build_model,
    build_resnet_model,
    build_vit_model,
)
from slip.models.text import TextTransformer

TINY_TEXT = dict(text_width=32, text_layers=2, text_heads=4, context_length=16, vocab_size=100)
TINY_SSL = dict(ssl_mlp_dim=64, ssl_embed_dim=8)


def tiny_vit(**overrides):
    args = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=4, embed_dim=24,
                **TINY_TEXT, **TINY_SSL)
    return build_vit_model(**{**args, **overrides})


def tiny_resnet(**overrides):
    args = dict(image_size=64, vision_layers=(1, 1, 1, 1), vision_width=16, embed_dim=24, **TINY_TEXT, **TINY_SSL)
    return build_resnet_model(**{**args, **overrides})


def random_tokens(batch: int, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of SOT, random words and EOT (the largest id) at random lengths, zero padded."""
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(2, context + 1, (1,), generator=generator))
        tokens[row, :length] = torch.randint(1, vocab - 2, (length,), generator=generator)
        tokens[row, 0] = vocab - 2
        tokens[row, length - 1] = vocab - 1
    return tokens


def make_batch(model, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = model.spec.preprocess.image_size
    out = {view: torch.randn(batch, 3, size, size, generator=generator) for view in ("image", "aug1", "aug2")}
    out["text"] = random_tokens(batch, model.spec.text.context_length, model.spec.text.vocab_size, generator)
    return out


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_every_registered_model_builds(name):
    """Every preset builds (on the meta device: no memory, no time) with the parts for all four inputs."""
    with torch.device("meta"):
        model = MODEL_BUILDERS[name]()
    assert set(model.inputs) == set(ALL_INPUTS)
    assert model.text.context_length == (32 if name == "tiny" else 77)  # tiny: the CPU-sized synthetic-data model
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


@pytest.mark.parametrize(
    "preset, timm_name, heads",
    [("vit_s16", "vit_small_patch16_224", 12), ("vit_b16", "vit_base_patch16_224", 12),
     ("vit_l16", "vit_large_patch16_224", 16)],
)
def test_vit_presets_match_timm_definitions(preset, timm_name, heads):
    """Our ViT towers have exactly timm's parameter shapes (S/16 with SLIP's 12 heads)."""
    with torch.device("meta"):
        ours = MODEL_BUILDERS[preset](inputs=("aug1", "aug2")).visual
        reference = timm.create_model(timm_name, num_classes=0, pretrained=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert ours.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize(
    "preset, layers, width, embed_dim, image_size, text_width",
    [("rn50", (3, 4, 6, 3), 64, 1024, 224, 512), ("rn101", (3, 4, 23, 3), 64, 512, 224, 512),
     ("rn50x4", (4, 6, 10, 6), 80, 640, 288, 640), ("rn50x16", (6, 8, 18, 8), 96, 768, 384, 768),
     ("rn50x64", (3, 15, 36, 10), 128, 1024, 448, 1024)],
)
def test_resnet_presets_match_openai_clip_shapes(openai_clip, preset, layers, width, embed_dim, image_size,
                                                 text_width):
    """Our ResNet CLIP presets have exactly the parameter shapes of OpenAI's model of that size."""
    with torch.device("meta"):
        ours = MODEL_BUILDERS[preset](inputs=("image", "text"))
        reference = openai_clip.model.CLIP(embed_dim, image_size, layers, width, None, 77, 49408, text_width,
                                           text_width // 64, 12)
    ours_visual = {k: v.shape for k, v in ours.state_dict().items() if k.startswith("visual.")}
    ref_visual = {k: v.shape for k, v in reference.state_dict().items() if k.startswith("visual.")}
    assert ours_visual == ref_visual
    assert ours.text.transformer.resblocks[0].attn.heads == text_width // 64
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(
    "inputs, has_text, has_ssl, keys",
    [(("image", "text"), True, False, {"image_embed", "text_embed", "logit_scale"}),
     (("aug1", "aug2"), False, True, {"aug1_embed", "aug2_embed"}),
     (ALL_INPUTS, True, True, {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"})],
)
@pytest.mark.parametrize("factory", [tiny_vit, tiny_resnet])
def test_model_builds_only_what_the_objective_needs(factory, inputs, has_text, has_ssl, keys):
    model = factory(inputs=inputs)
    assert (model.text is not None) == has_text
    assert (model.logit_scale is not None) == has_text
    assert (model.image_mlp is not None) == has_ssl
    outputs = model(make_batch(model))  # the batch carries all four views; extra ones are ignored
    assert set(outputs) == keys


def test_model_without_text_tower_refuses_joint_space_encoders():
    model = tiny_vit(inputs=("aug1", "aug2"))
    batch = make_batch(model)
    assert model.image_features(batch["image"]).shape == (3, 48)
    with pytest.raises(RuntimeError, match="without a text tower"):
        model.encode_text(batch["text"])
    with pytest.raises(RuntimeError, match="without a text tower"):
        model.encode_image(batch["image"])


def test_unknown_inputs_are_rejected():
    with pytest.raises(ValueError, match="subset"):
        tiny_vit(inputs=("image", "caption"))


def test_logit_scale_initialised_to_clip_value_and_clamped_at_100():
    model = tiny_vit()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model(make_batch(model))["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(make_batch(model))["logit_scale"].item() == 100.0


def test_encoders_equal_forward_outputs():
    model = tiny_vit().eval()
    batch = make_batch(model)
    outputs = model(batch)
    torch.testing.assert_close(model.encode_image(batch["image"]), outputs["image_embed"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_text(batch["text"]), outputs["text_embed"], rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_trimmed_text_equals_full_length_pass(batch):
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=100, context_length=32, width=64, layers=3, heads=4, trim=True)
    tokens = random_tokens(batch, 32, 100, torch.Generator().manual_seed(batch))
    trimmed = tower(tokens)
    tower.trim = False
    full = tower(tokens)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_text_features_ignore_everything_after_eot():
    """What makes trimming exact: the causal mask hides every column after EOT from the pooled output."""
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=100, context_length=24, width=32, layers=2, heads=4, trim=False)
    tokens = random_tokens(4, 24, 100, torch.Generator().manual_seed(1))
    eot = tokens.argmax(dim=-1)
    scrambled = tokens.clone()
    for row, position in enumerate(eot.tolist()):
        scrambled[row, position + 1:] = torch.randint(1, 98, (24 - position - 1,))
    torch.testing.assert_close(tower(tokens), tower(scrambled), rtol=1e-5, atol=1e-6)


def test_text_longer_than_context_is_rejected():
    tower = TextTransformer(vocab_size=100, context_length=8, width=32, layers=1, heads=4)
    with pytest.raises(ValueError, match="context_length is 8"):
        tower(torch.ones(2, 9, dtype=torch.long))


@pytest.mark.parametrize("training", [True, False])
def test_batched_views_equal_separate_passes_for_vit(training):
    torch.manual_seed(0)
    model = tiny_vit().train(training)
    batch = make_batch(model, batch=4)
    batched = model(batch)
    model.batch_views = False
    separate = model(batch)
    for key in batched:
        torch.testing.assert_close(batched[key], separate[key], rtol=1e-5, atol=1e-6)


def test_resnet_in_training_keeps_views_apart_because_batchnorm_couples_samples():
    torch.manual_seed(0)
    model = tiny_resnet().train()
    batch = make_batch(model, batch=4)
    calls = []
    handle = model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model(batch)
    assert calls == [4, 4, 4]
    model.eval()
    calls.clear()
    model(batch)
    assert calls == [12]
    handle.remove()


def test_text_tower_initialisation_follows_clip():
    torch.manual_seed(0)
    tower = TextTransformer(width=256, layers=4, heads=4, context_length=77, vocab_size=49408)
    block = tower.transformer.resblocks[0]
    proj_std = 256**-0.5 * (2 * 4) ** -0.5
    checks = [
        (tower.token_embedding.weight, 0.02),
        (tower.positional_embedding, 0.01),
        (block.attn.in_proj_weight, 256**-0.5),
        (block.attn.out_proj.weight, proj_std),
        (block.mlp.c_fc.weight, (2 * 256) ** -0.5),
        (block.mlp.c_proj.weight, proj_std),
    ]
    for tensor, expected_std in checks:
        assert tensor.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.count_nonzero(block.attn.in_proj_bias) == 0


def test_resnet_initialisation_follows_clip():
    model = tiny_resnet()
    for stage in (model.visual.layer1, model.visual.layer4):
        assert torch.count_nonzero(stage[0].bn3.weight) == 0
    pool = model.visual.attnpool
    assert pool.q_proj.weight.std().item() == pytest.approx(pool.c_proj.in_features**-0.5, rel=0.1)


@pytest.mark.parametrize("factory", [tiny_vit, tiny_resnet])
def test_the_spec_rebuilds_the_same_model(factory):
    model = factory(inputs=("image", "text"))
    rebuilt = build_model(model.spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_vit_accepts_other_image_sizes():
    model = tiny_vit(image_size=48, inputs=("image", "text"))
    images = torch.randn(2, 3, 48, 48)
    assert model.encode_image(images).shape == (2, 24)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit(image_size=50)


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                                embed_dim=32, text_width=32, text_layers=2, text_heads=1, vocab_size=100,
                                context_length=8, inputs=("image", "text")),
        lambda: build_resnet_model(image_size=64, vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=32,
                                   text_width=32, text_layers=2, text_heads=1, vocab_size=100, context_length=8,
                                   inputs=("image", "text")),
    ],
    ids=["vit", "resnet"],
)
def test_grad_checkpointing_gives_the_same_gradients(build) -> None:
    torch.manual_seed(0)
    model = build().eval()  # training mode, with BatchNorm's running statistics: test_batchnorm_statistics.py
    size = model.spec.preprocess.image_size
    batch = {"image": torch.randn(2, 3, size, size), "text": torch.randint(1, 99, (2, 8))}
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(batch)
        (out["image_embed"].square().sum() + out["text_embed"].square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_channels_last_resnet_is_the_plain_resnet_to_float_rounding():
    """Same weights, NHWC layout: the same features and the same gradients, and the layout really is NHWC."""
    torch.manual_seed(0)
    fast = tiny_resnet(inputs=("image", "text"))
    plain = tiny_resnet(inputs=("image", "text"), channels_last=False)
    plain.load_state_dict(fast.state_dict())
    assert fast.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.visual.conv1.weight.is_contiguous() and not fast.visual.conv1.weight.is_contiguous()
    images = torch.randn(3, 3, 64, 64)
    fast.eval(), plain.eval()
    outputs = [model.encode_image(images) for model in (fast, plain)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    fast.train(), plain.train()
    for model in (fast, plain):
        model.encode_image(images).square().sum().backward()
    for (name, fast_param), plain_param in zip(fast.visual.named_parameters(), plain.visual.parameters()):
        # Relative to each gradient's scale: convolutions summed in another order differ by rounding of the
        # large entries (measured: at most 1e-5 of the largest entry), however small a single entry is.
        worst = (fast_param.grad - plain_param.grad).abs().max()
        assert worst <= 1e-4 * plain_param.grad.abs().max() + 1e-6, (name, float(worst))


@pytest.mark.parametrize(("norm", "layers"), [("batch", ("bn1", "bn2")), ("layer", ("ln1", "ln2")), ("none", ())])
def test_ssl_head_norm_choices(norm, layers):
    from slip.models.vision import has_batch_statistics

    model = tiny_vit(ssl_head_norm=norm, inputs=("aug1", "aug2")).train()
    head = model.image_mlp
    norms = [name for name, module in head.named_children() if not isinstance(module, (torch.nn.Linear, torch.nn.ReLU))]
    assert tuple(norms) == layers and has_batch_statistics(head) == (norm == "batch")
    images = torch.randn(4, 3, 32, 32)
    out = model({"aug1": images, "aug2": images.flip(-1)})
    out["aug1_embed"].sum().backward()
    assert torch.isfinite(out["aug1_embed"]).all() and head.layer1.weight.grad is not None
    if norm != "batch":  # a sample's embedding does not depend on the others in the batch
        alone = model({"aug1": images[:1], "aug2": images[:1]})["aug1_embed"]
        torch.testing.assert_close(alone, out["aug1_embed"][:1])
    rebuilt = build_model(model.spec)
    assert rebuilt.image_mlp.state_dict().keys() == head.state_dict().keys()


def test_ssl_head_norm_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"ssl_head_norm must be one of \['batch', 'layer', 'none'\], got 'group'"):
        tiny_vit(ssl_head_norm="group")


def test_tower_features_then_heads_is_the_forward_pass():
    torch.manual_seed(0)
    model = tiny_resnet().eval()
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(3, 3, 64, 64, generator=generator), "aug1": torch.randn(3, 3, 64, 64),
             "aug2": torch.randn(3, 3, 64, 64), "text": random_tokens(3, 16, 100, generator)}
    features = model.tower_features(batch)
    assert set(features) == {"image", "text", "aug1", "aug2"}
    torch.testing.assert_close(features["image"], model.image_features(batch["image"]))
    split, whole = model.heads(features), model(batch)
    assert split.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=0)


def _patch_dropout_model(patch_dropout: float, ssl_patch_dropout: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_vit_model(image_size=32, patch_size=4, vision_width=16, vision_layers=1, vision_heads=2,
                           embed_dim=8, text_width=16, text_layers=1, text_heads=2, context_length=8, vocab_size=64,
                           ssl_mlp_dim=16, ssl_embed_dim=8, patch_dropout=patch_dropout,
                           ssl_patch_dropout=ssl_patch_dropout)


def _tokens_entering_the_blocks(model, images: torch.Tensor) -> list[torch.Tensor]:
    """The token sequences the first block receives, one per tower call."""
    seen = []
    handle = model.visual.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        model.image_features(images)
    finally:
        handle.remove()
    return seen


def test_patch_dropout_zero_is_the_plain_model_and_evaluation_keeps_every_token() -> None:
    plain, zero, half = _patch_dropout_model(0.0), _patch_dropout_model(0.0), _patch_dropout_model(0.5)
    batch = make_batch(plain, batch=3)
    for model in (plain, zero):
        model.zero_grad()
        sum(value.sum() for value in model(batch).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), zero.parameters()):
        assert torch.equal(a, b) and (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name
    half.load_state_dict(plain.state_dict())
    plain.eval(), half.eval()
    with torch.no_grad():
        for key, value in plain(batch).items():
            assert torch.equal(half(batch)[key], value), key


def test_patch_dropout_keeps_a_uniform_random_subset_per_image_with_its_positions() -> None:
    model = _patch_dropout_model(0.5).train()
    visual = model.visual
    with torch.no_grad():  # token = (its patch's pixel value, its position index, class marker, 0, ...)
        visual.patch_embed.proj.weight.zero_()
        visual.patch_embed.proj.bias.zero_()
        visual.patch_embed.proj.weight[0, 0] = 1.0 / 16  # channel 0: the mean of the patch's red pixels
        visual.pos_embed.zero_()
        visual.pos_embed[0, 1:, 1] = torch.arange(64, dtype=torch.float32)
        visual.cls_token.zero_()
        visual.cls_token[0, 0, 2] = 1.0
    grid = torch.arange(64, dtype=torch.float32).view(8, 8)
    images = grid.repeat_interleave(4, 0).repeat_interleave(4, 1).expand(2000, 3, 32, 32).contiguous()
    (tokens,) = _tokens_entering_the_blocks(model, images)
    assert tokens.shape == (2000, 1 + 32, 16)
    assert torch.equal(tokens[:, 0, 2], torch.ones(2000))  # the class token always, first
    content, position = tokens[:, 1:, 0], tokens[:, 1:, 1]
    torch.testing.assert_close(content, position)  # every kept token carries its own positional embedding
    kept = torch.zeros(2000, 64)
    kept.scatter_(1, position.round().long(), 1.0)
    assert torch.equal(kept.sum(dim=1), torch.full((2000,), 32.0))  # 32 distinct patches per image
    assert len({tuple(row.nonzero().flatten().tolist()) for row in kept}) > 1990  # drawn per image
    frequency = kept.mean(dim=0)
    assert (frequency - 0.5).abs().max() < 0.05, frequency  # each patch kept half the time (4.5 sigma)


def test_the_ssl_views_take_their_own_patch_dropout_rate() -> None:
    model = _patch_dropout_model(0.0, ssl_patch_dropout=0.75).train()
    seen = []
    handle = model.visual.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    model(make_batch(model, batch=2))
    handle.remove()
    assert sorted(shape[1] for shape in seen) == [1 + 16, 1 + 64]  # SSL views batched (75% dropped), image whole
    with pytest.raises(ValueError, match=r"ssl_patch_dropout must be a fraction in \[0, 1\), got 1.0"):
        _patch_dropout_model(0.0, ssl_patch_dropout=1.0)
