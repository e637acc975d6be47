"""open_clip interop: our models exported to open_clip directories and open_clip models read back, compared by their
encodings against open_clip itself (built locally, no network), with exact round trips and one-line refusals."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from slip.checkpoint import CheckpointError
from slip.interop.common import ExportError
from slip.interop.open_clip import (
    CONFIG_NAME,
    SSL_HEAD_NOTE,
    TEXT_CFG_DEFAULTS,
    VISION_CFG_DEFAULTS,
    export_open_clip,
    read_open_clip,
)
from slip.interop.openai import from_openai
from slip.losses import SigLIPLoss
from slip.models import build_model, build_resnet_model, build_vit_model, vit_s16, vit_ti16

open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT, VOCAB = 16, 100
# Text heads 2 at width 64: not CLIP's width / 64 rule, so heads must come from the config, not the shapes.
TEXT = dict(text_width=64, text_layers=2, text_heads=2, context_length=CONTEXT, vocab_size=VOCAB)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TOLERANCE = 1e-5


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every saved parameter and buffer drawn at random (norm scales around 1, variances positive), then eval mode.

    Non-persistent buffers (open_clip's causal `attn_mask`) are computed, not weights, and stay as they are.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                tensor.copy_(torch.randint(1, 1000, tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() == 1 and name.endswith("weight"):
                nn.init.normal_(tensor, mean=1.0, std=0.2, generator=generator)
            else:
                nn.init.normal_(tensor, std=0.1, generator=generator)
    return model.eval()


def tokens(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """[batch, CONTEXT] rows of random words ending in EOT (the largest id), zero padded."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(batch, CONTEXT, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(2, CONTEXT + 1, (1,), generator=generator))
        rows[row, :length] = torch.randint(1, VOCAB - 1, (length,), generator=generator)
        rows[row, length - 1] = VOCAB - 1
    return rows


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return float((ours - theirs).abs().max() / ours.abs().max())


def assert_same_encodings(label: str, ours: nn.Module, theirs: nn.Module, size: int) -> None:
    """Our encode_image / encode_text against open_clip's (unnormalised), to TOLERANCE relative."""
    pixels, text = images(size), tokens()
    with torch.no_grad():
        image_diff = relative_difference(ours.encode_image(pixels), theirs.encode_image(pixels, normalize=False))
        text_diff = relative_difference(ours.encode_text(text), theirs.encode_text(text, normalize=False))
    print(f"{label}: encode_image max rel diff {image_diff:.2e}, encode_text max rel diff {text_diff:.2e}")
    assert image_diff < TOLERANCE
    assert text_diff < TOLERANCE


def openai_vit(**overrides):
    """OpenAI-layout ViT, 4 heads at width 128 (not the width / 64 rule)."""
    args = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=4, openai_layout=True,
                embed_dim=32, image_mean=MEAN, image_std=STD, inputs=("image", "text"), **TEXT)
    return build_vit_model(**{**args, **overrides})


def resnet(**overrides):
    """ModifiedResNet with 16 attention-pool heads at width 512 (not the width*32 / 64 rule)."""
    args = dict(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=16, embed_dim=32,
                image_mean=MEAN, image_std=STD, inputs=("image", "text"), **TEXT)
    return build_resnet_model(**{**args, **overrides})


def timm_vit(**overrides):
    """SLIP's ViT-Ti/16 at 224 px (timm's vit_tiny_patch16_224), as a full SLIP model with its SSL head."""
    args = dict(image_size=224, embed_dim=32, image_mean=MEAN, image_std=STD, ssl_mlp_dim=32, ssl_embed_dim=16,
                **TEXT)
    return vit_ti16(**{**args, **overrides})


FAMILIES = {"openai_vit": openai_vit, "resnet": resnet, "timm_vit": timm_vit}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    """(family, our randomised model, the directory it was exported to, the Exported record)."""
    model = randomise(FAMILIES[request.param](), seed=len(request.param))
    out_dir = tmp_path_factory.mktemp(request.param) / "open_clip"
    return request.param, model, out_dir, export_open_clip(model, out_dir)


def test_export_loads_in_open_clip_with_the_same_encodings(exported):
    family, model, out_dir, result = exported
    assert [p.name for p in result.files] == [CONFIG_NAME, "open_clip_model.safetensors"]
    assert all(p.is_file() for p in result.files)
    theirs = open_clip.create_model("local-dir:" + str(out_dir)).eval()  # strict load of the written weights
    assert_same_encodings(f"slip -> open_clip {family}", model, theirs, model.spec.preprocess.image_size)
    with torch.no_grad():
        assert torch.equal(theirs.logit_scale, model.logit_scale)
    assert tuple(theirs.visual.preprocess_cfg["mean"]) == MEAN
    assert tuple(theirs.visual.preprocess_cfg["std"]) == STD


def test_export_config_and_notes(exported):
    family, model, out_dir, result = exported
    config = json.loads((out_dir / CONFIG_NAME).read_text())
    model_cfg = config["model_cfg"]
    assert model_cfg["quick_gelu"] is True and model_cfg["embed_dim"] == 32
    assert model_cfg["text_cfg"]["heads"] == 2 and model_cfg["text_cfg"]["context_length"] == CONTEXT
    assert config["preprocess_cfg"] == {"mean": list(MEAN), "std": list(STD)}
    vision_cfg = model_cfg["vision_cfg"]
    if family == "timm_vit":
        assert vision_cfg["timm_model_name"] == "vit_tiny_patch16_224"
        assert result.notes == [SSL_HEAD_NOTE]  # a SLIP model: its SSL head is left out, and said so
    else:
        assert result.notes == []
        assert vision_cfg["head_width"] == 32


def test_round_trip_is_exact(exported):
    family, model, out_dir, _ = exported
    converted = read_open_clip(out_dir)
    assert converted is not None and converted.info.format == "open_clip"
    assert converted.spec.inputs == ("image", "text")  # open_clip has no SSL head to read back
    # every field open_clip records is read back as the one we built with: the tower type, every size, drop path
    assert type(converted.spec.vision) is type(model.spec.vision)
    assert converted.spec.sizes() == model.spec.sizes()
    drop_path = [getattr(spec.vision, "drop_path_rate", None) for spec in (converted.spec, model.spec)]
    assert drop_path[0] == drop_path[1]
    rebuilt = build_model(converted.spec)
    rebuilt.load_state_dict(converted.state, strict=True)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("image_mlp.")}
    back = rebuilt.state_dict()
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_ssl_head_note_for_an_openai_layout_slip_model(tmp_path):
    model = openai_vit(inputs=("image", "text", "aug1", "aug2"), ssl_mlp_dim=32, ssl_embed_dim=16)
    result = export_open_clip(model, tmp_path / "out")
    assert result.notes == [SSL_HEAD_NOTE]
    converted = read_open_clip(tmp_path / "out")
    assert not any(key.startswith("image_mlp.") for key in converted.state)
    assert converted.spec.inputs == ("image", "text")


def test_stochastic_depth_is_noted_not_exported(tmp_path):
    """open_clip's VisionTransformer has no drop path: at inference the same model, so exported with a note."""
    model = randomise(openai_vit(drop_path_rate=0.1), seed=2)
    result = export_open_clip(model, tmp_path / "out")
    assert len(result.notes) == 1 and "drop_path_rate=0.1" in result.notes[0]
    theirs = open_clip.create_model("local-dir:" + str(tmp_path / "out")).eval()
    assert_same_encodings("slip -> open_clip openai_vit with drop path", model, theirs, 32)


@pytest.mark.parametrize("family", ["openai_vit", "resnet"])
def test_a_siglip_bias_is_open_clips_logit_bias_both_ways(tmp_path, family):
    """Exported with SigLIP's learned bias, open_clip builds it as its `logit_bias`, and its SigLipLoss on its
    outputs is our SigLIPLoss on ours; reading the directory gives the bias back to the bit."""
    model = randomise(FAMILIES[family](), seed=11)
    objective = SigLIPLoss()
    with torch.no_grad():
        objective.logit_bias.fill_(-9.8765432)
    bias = objective.logit_bias.detach().clone()
    result = export_open_clip(model, tmp_path / "out", logit_bias=bias)
    assert result.notes == []
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["model_cfg"]["init_logit_bias"] == float(bias)
    theirs = open_clip.create_model("local-dir:" + str(tmp_path / "out")).eval()
    assert torch.equal(theirs.logit_bias.detach(), bias)
    pixels, text = images(model.spec.preprocess.image_size, batch=3), tokens()
    with torch.no_grad():
        their_loss = open_clip.loss.SigLipLoss()(*theirs(pixels, text))
        our_loss = objective(model({"image": pixels, "text": text}))["loss"]
    assert relative_difference(our_loss, their_loss) < TOLERANCE

    converted = read_open_clip(tmp_path / "out")
    assert (converted.info.objective, converted.info.logit_bias) == ("SigLIPLoss", float(bias))
    assert list(converted.objective_state) == ["logit_bias"]
    assert torch.equal(converted.objective_state["logit_bias"].view(torch.int32), bias.view(torch.int32))
    assert "logit_bias" not in converted.state


def test_a_bias_open_clip_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ExportError) as error:
        export_open_clip(openai_vit(), tmp_path / "out", logit_bias=torch.zeros(2))
    assert "(2,)" in _assert_one_line(error) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# open_clip -> slip


def _open_clip_config(kind: str) -> dict:
    text_cfg = dict(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=2, layers=2)
    vision_cfg = {
        "vit": dict(image_size=32, patch_size=8, width=128, layers=2, head_width=32),
        "resnet": dict(image_size=32, layers=[1, 1, 1, 1], width=16, head_width=32),
        "timm": dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="token",
                     timm_proj="linear", timm_proj_bias=False, image_size=224),
        "custom_text": dict(image_size=32, patch_size=8, width=64, layers=1, head_width=16),
    }[kind]
    model_cfg = dict(embed_dim=24, quick_gelu=True, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if kind == "custom_text":
        model_cfg["custom_text"] = True
    return model_cfg


def _write_hub_dir(directory: Path, model_cfg: dict, state: dict, weights_name: str) -> None:
    directory.mkdir(parents=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in state.items()}
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(directory / weights_name))
    else:
        torch.save(tensors, directory / weights_name)


@pytest.mark.parametrize("kind, weights_name", [
    ("vit", "open_clip_model.safetensors"),
    ("resnet", "open_clip_pytorch_model.bin"),
    ("timm", "open_clip_model.safetensors"),
    ("custom_text", "open_clip_model.safetensors"),
])
def test_read_open_clip_model(tmp_path, kind, weights_name):
    model_cfg = _open_clip_config(kind)
    model_class = open_clip.model.CustomTextCLIP if kind == "custom_text" else open_clip.model.CLIP
    theirs = randomise(model_class(**{k: v for k, v in model_cfg.items() if k != "custom_text"}), seed=7)
    _write_hub_dir(tmp_path / "hub", model_cfg, theirs.state_dict(), weights_name)
    assert open_clip.create_model("local-dir:" + str(tmp_path / "hub")) is not None  # open_clip reads it too

    converted = read_open_clip(tmp_path / "hub")
    assert converted.spec.preprocess.mean == MEAN and converted.spec.preprocess.std == STD
    assert converted.spec.text.heads == 2
    ours = build_model(converted.spec).eval()
    ours.load_state_dict(converted.state, strict=True)
    assert_same_encodings(f"open_clip -> slip {kind}", ours, theirs, converted.spec.preprocess.image_size)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_from_openai_reads_an_open_clip_state_dict(kind):
    """A plain open_clip state dict of an OpenAI-style model is OpenAI CLIP's layout (heads: width / 64)."""
    vision_cfg = (dict(image_size=32, patch_size=8, width=128, layers=2) if kind == "vit"
                  else dict(image_size=32, layers=[1, 1, 1, 1], width=16))
    text_cfg = dict(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=1, layers=2)
    theirs = randomise(open_clip.model.CLIP(24, vision_cfg, text_cfg, quick_gelu=True), seed=3)
    converted = from_openai(theirs.state_dict())
    ours = build_model(converted.spec).eval()
    ours.load_state_dict(converted.state, strict=True)
    assert_same_encodings(f"open_clip state dict -> from_openai {kind}", ours, theirs, 32)


# ---------------------------------------------------------------------------------------------------------------
# refusals


def _assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("build, expected", [
    (lambda: build_vit_model(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                             embed_dim=32, inputs=("image", "text"), **TEXT), "no timm name"),
    # timm's vit_small_patch16_224 has SLIP's ViT-S shapes but 6 heads, SLIP's has 12.
    (lambda: vit_s16(inputs=("image", "text"), **TEXT), "num_heads=6"),
    (lambda: openai_vit(inputs=("aug1", "aug2")), "no text tower"),
])
def test_export_refusals_write_nothing(tmp_path, build, expected):
    out_dir = tmp_path / "out"
    with pytest.raises(ExportError) as error:
        export_open_clip(build(), out_dir)
    assert expected in _assert_one_line(error)
    assert not out_dir.exists()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("refusals") / "vit"
    export_open_clip(randomise(openai_vit(), seed=5), out_dir)
    return out_dir


def _edited_copy(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((target / CONFIG_NAME).read_text())
    edit(config["model_cfg"])
    (target / CONFIG_NAME).write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit, named", [
    (lambda c: c.pop("quick_gelu"), "model_cfg.quick_gelu=false (the default)"),
    (lambda c: c.update(init_logit_bias=-10.0), "model_cfg.init_logit_bias=-10.0"),
    (lambda c: c.update(multimodal_cfg={"width": 64}), "model_cfg.multimodal_cfg"),
    (lambda c: c["vision_cfg"].update(attentional_pool=True), "model_cfg.vision_cfg.attentional_pool=true"),
    (lambda c: c["vision_cfg"].update(pool_type="avg"), 'model_cfg.vision_cfg.pool_type="avg"'),
    (lambda c: c["vision_cfg"].update(norm_kwargs={"eps": 1e-6}), "model_cfg.vision_cfg.norm_kwargs"),
    (lambda c: c["vision_cfg"].update(timm_model_name="vit_base_patch16_clip_224", timm_pool="token"),
     "vit_base_patch16_clip_224"),
    (lambda c: c["vision_cfg"].update(timm_model_name="vit_no_such_model", timm_pool="token"), "vit_no_such_model"),
    (lambda c: c["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224"), 'timm_pool="avg" (the default)'),
    (lambda c: c["text_cfg"].update(pool_type="eos"), 'model_cfg.text_cfg.pool_type="eos"'),
    (lambda c: c["text_cfg"].update(hf_model_name="roberta-base"), "model_cfg.text_cfg.hf_model_name"),
    (lambda c: c["text_cfg"].update(no_such_key=1), "model_cfg.text_cfg.no_such_key"),
])
def test_unsupported_config_is_refused_in_one_line(tmp_path, vit_dir, edit, named):
    directory = _edited_copy(vit_dir, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError) as error:
        read_open_clip(directory)
    message = _assert_one_line(error)
    assert str(directory / CONFIG_NAME) in message and named in message, message


def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path, vit_dir):
    directory = _edited_copy(vit_dir, tmp_path / "edited", lambda c: c["text_cfg"].update(layers=3))
    with pytest.raises(CheckpointError) as error:
        read_open_clip(directory)
    message = _assert_one_line(error)
    assert str(directory / "open_clip_model.safetensors") in message and "transformer.resblocks.2" in message

    (directory / CONFIG_NAME).write_text((vit_dir / CONFIG_NAME).read_text())
    (directory / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as error:
        read_open_clip(directory)
    assert "open_clip_model.safetensors" in _assert_one_line(error)


def test_other_paths_are_not_open_clip(tmp_path, vit_dir):
    assert read_open_clip(vit_dir / "open_clip_model.safetensors") is None
    assert read_open_clip(tmp_path) is None
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / CONFIG_NAME).write_text((vit_dir / CONFIG_NAME).read_text())
    assert read_open_clip(only_config) is None


def test_config_defaults_are_open_clips():
    """What a config means by leaving a key out is open_clip's dataclass default."""
    assert dict(VISION_CFG_DEFAULTS) == asdict(open_clip.model.CLIPVisionCfg())
    assert dict(TEXT_CFG_DEFAULTS) == asdict(open_clip.model.CLIPTextCfg())
