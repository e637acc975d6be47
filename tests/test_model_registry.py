"""Every registered model: builds, trains a step, round-trips through its spec and our checkpoint formats; the spec
validates each field with a one-line error naming it; older checkpoints' flat `arch` records read into specs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slip
from slip.checkpoint import read_checkpoint, save_model
from slip.models import (ALL_INPUTS, MODEL_BUILDERS, ModelSpec, Preprocess, ResNetSpec, ViTSpec, build_model,
                         registered_models, resnet_spec, spec_from_legacy_arch, tiny, vit_spec)
from slip.pretrained import load_pretrained

FIXTURE = Path(__file__).parent / "fixtures" / "pre_data_builder_step3.pt"
TINY_TEXT = dict(text_width=32, text_layers=1, text_heads=2, context_length=8, vocab_size=64)
TINY_HEADS = dict(embed_dim=16, ssl_mlp_dim=32, ssl_embed_dim=8)


def shrunk(name: str) -> torch.nn.Module:
    """`name`'s builder with overrides that keep its tower type and its other settings (layout, norms, mean and
    std) but make every size tiny, so that it runs forward and backward on the CPU in well under a second: a ViT
    keeps its patch size and sees a 2x2 patch grid, one 32-wide block; a ModifiedResNet keeps its four stages, one
    8-wide bottleneck each, at 64 px (the smallest side its 32x stride and attention pool take)."""
    preset = registered_models()[name].spec()
    if isinstance(preset.vision, ViTSpec):
        tower = dict(image_size=2 * preset.vision.patch_size, vision_width=32, vision_layers=1, vision_heads=2)
    else:
        tower = dict(image_size=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_heads=4)
    model = MODEL_BUILDERS[name](**tower, **TINY_TEXT, **TINY_HEADS)
    assert type(model.spec.vision) is type(preset.vision)
    return model


def tiny_batch(model: torch.nn.Module, size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every input the model takes, random: images of its side, token rows ending in EOT (the largest id)."""
    generator = torch.Generator().manual_seed(seed)
    side = model.spec.preprocess.image_size
    batch = {view: torch.randn(size, 3, side, side, generator=generator) for view in ("image", "aug1", "aug2")}
    tokens = torch.randint(1, model.spec.text.vocab_size - 2, (size, model.spec.text.context_length),
                           generator=generator)
    tokens[:, -1] = model.spec.text.vocab_size - 1
    return {**batch, "text": tokens}


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_the_registry_is_every_preset_builder() -> None:
    assert slip.list_models() == sorted(MODEL_BUILDERS) == sorted(registered_models())
    assert len(slip.list_models()) == 10


@pytest.mark.parametrize("name", slip.list_models())
def test_the_full_size_spec_round_trips_and_builds_the_same_model(name: str) -> None:
    spec = registered_models()[name].spec()
    data = json.loads(json.dumps(spec.to_dict()))  # plain JSON data, as checkpoints and safetensors keep it
    assert ModelSpec.from_dict(data) == spec
    with torch.device("meta"):  # structure only: no memory, no time
        built, rebuilt = MODEL_BUILDERS[name](), build_model(ModelSpec.from_dict(data))
    assert built.spec == spec and shapes(rebuilt) == shapes(built)
    assert set(built.inputs) == set(ALL_INPUTS)


@pytest.mark.parametrize("name", slip.list_models())
def test_every_registered_model_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = shrunk(name)
    outputs = model(tiny_batch(model))
    assert set(outputs) == {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"}
    total = sum(value.float().sum() for value in outputs.values())
    total.backward()
    assert torch.isfinite(total)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), parameter_name
    assert model.image_projection is None or model.image_projection.grad is not None


@pytest.mark.parametrize("name", slip.list_models())
def test_every_registered_model_round_trips_through_its_spec(name: str) -> None:
    model = shrunk(name)
    spec = ModelSpec.from_dict(json.loads(json.dumps(model.spec.to_dict())))
    assert spec == model.spec
    assert shapes(build_model(spec)) == shapes(model)


@pytest.mark.parametrize("name", slip.list_models())
def test_every_registered_model_round_trips_through_our_checkpoint(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    model = shrunk(name)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # weights no fresh build has
    path = save_model(model, tmp_path / f"{name}.pt")
    assert read_checkpoint(path)["spec"] == model.spec.to_dict()
    loaded = load_pretrained(path)
    assert loaded.spec == model.spec
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key


# ---------------------------------------------------------------- checkpoints of earlier versions

def test_the_committed_old_checkpoints_arch_is_todays_tiny_spec() -> None:
    old = torch.load(FIXTURE, map_location="cpu", weights_only=False)
    assert "family" in old["arch"] and "patch_dropout" not in old["arch"]  # flat, and from before patch dropout
    assert spec_from_legacy_arch(old["arch"]) == tiny().spec


# What build_resnet_model recorded as `arch` before the spec (dict(locals(), family=...)) for these sizes.
OLD_RESNET_ARCH = dict(
    image_size=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_heads=4, embed_dim=16, text_width=32,
    text_layers=1, text_heads=2, context_length=8, vocab_size=64, ssl_mlp_dim=4096, ssl_embed_dim=256,
    ssl_head_norm="batch", logit_scale_init=2.659260036932778,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    inputs=("image", "text"), channels_last=True, family="resnet",
)


@pytest.mark.parametrize("source", ["fixture", "resnet"])
def test_a_flat_arch_checkpoint_loads_into_the_spec_todays_builder_gives(tmp_path: Path, source: str) -> None:
    if source == "fixture":
        arch = torch.load(FIXTURE, map_location="cpu", weights_only=False)["arch"]
        today = tiny()
    else:
        arch = OLD_RESNET_ARCH
        today = slip.build_resnet_model(**{key: value for key, value in arch.items() if key != "family"})
    assert spec_from_legacy_arch(arch) == today.spec
    torch.save({"format": "slip", "format_version": 1, "arch": arch, "model": today.state_dict()}, tmp_path / "old.pt")
    loaded = load_pretrained(tmp_path / "old.pt")
    assert loaded.spec == today.spec
    for key, value in today.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_old_safetensors_file_with_a_flat_arch_loads(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    arch = torch.load(FIXTURE, map_location="cpu", weights_only=False)["arch"]
    model = tiny()
    metadata = {"format": "slip-safetensors", "format_version": "1", "arch": json.dumps(arch)}
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    safetensors.save_file(state, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = load_pretrained(tmp_path / "old.safetensors")
    assert loaded.spec == model.spec
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_without_a_spec_is_one_line_naming_the_file(tmp_path: Path) -> None:
    torch.save({"format": "slip", "format_version": 1, "arch": {"family": "mlp"}, "model": {}}, tmp_path / "odd.pt")
    with pytest.raises(slip.checkpoint.CheckpointError) as error:
        load_pretrained(tmp_path / "odd.pt")
    assert str(error.value) == (f"{tmp_path / 'odd.pt'}: cannot read its model spec: arch record: family='mlp' is "
                                "not one of ['resnet', 'vit']")


# ---------------------------------------------------------------- validation: one line naming the field

VIT_CASES = [
    ("image_size", 0), ("image_size", 30), ("patch_size", -4), ("vision_width", "wide"), ("vision_width", 31),
    ("vision_layers", 0), ("vision_heads", 1.5), ("openai_layout", "yes"), ("drop_path_rate", 1.0),
    ("patch_dropout", -0.1), ("ssl_patch_dropout", 1.0), ("text_width", 0), ("text_width", 30),
    ("text_layers", True), ("text_heads", 0), ("context_length", 0), ("vocab_size", -1), ("embed_dim", 0),
    ("ssl_mlp_dim", 0), ("ssl_embed_dim", "8"), ("ssl_head_norm", "group"), ("logit_scale_init", "hot"),
    ("image_mean", (0.5, 0.5)), ("image_mean", "abc"), ("image_std", (0.5, 0.0, 0.5)), ("image_std", (1, 1, None)),
    ("inputs", ()), ("inputs", ("image", "caption")),
]
RESNET_CASES = [
    ("image_size", 48), ("vision_layers", (3, 4, 6)), ("vision_layers", (3, 0, 6, 3)), ("vision_width", 0),
    ("vision_heads", -2), ("channels_last", 1),
]


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert "\n" not in message and name in message, message


@pytest.mark.parametrize(("field", "value"), VIT_CASES, ids=[f"{f}={v!r}" for f, v in VIT_CASES])
def test_a_bad_vit_model_field_is_one_line_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError) as error:
        vit_spec(**{**dict(image_size=32, patch_size=8, vision_width=32, vision_heads=2), field: value})
    assert_one_line_naming(error, "inputs" if field == "inputs" else field)


@pytest.mark.parametrize(("field", "value"), RESNET_CASES, ids=[f"{f}={v!r}" for f, v in RESNET_CASES])
def test_a_bad_resnet_field_is_one_line_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError) as error:
        resnet_spec(**{"image_size": 64, field: value})
    assert_one_line_naming(error, field)


def test_a_bad_interpolation_is_one_line_naming_it() -> None:
    with pytest.raises(ValueError) as error:
        Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="lanczos")
    assert_one_line_naming(error, "interpolation")


def test_specs_are_frozen_and_compare_by_value() -> None:
    spec = vit_spec(image_size=32, patch_size=8)
    with pytest.raises(AttributeError):
        spec.vision.width = 64  # type: ignore[misc]
    assert spec == vit_spec(image_size=32, patch_size=8) != vit_spec(image_size=32, patch_size=8, vision_width=384)
    assert isinstance(resnet_spec().vision, ResNetSpec) and resnet_spec().vision.heads == 32  # width * 32 / 64


@pytest.mark.parametrize(("change", "named"), [
    (lambda d: d["vision"].update(type="mlp"), "vision.type='mlp'"),
    (lambda d: d.pop("head"), "'head' is missing"),
    (lambda d: d["text"].update(depth=3), "text:"),
    (lambda d: d["preprocess"].update(mean=[0.5]), "image_mean"),
])
def test_a_bad_spec_record_is_one_line_naming_the_part(change, named: str) -> None:
    data = vit_spec().to_dict()
    change(data)
    with pytest.raises(ValueError) as error:
        ModelSpec.from_dict(data)
    assert_one_line_naming(error, named)


def test_create_model_takes_a_spec_and_names_a_different_tower_type(tmp_path: Path) -> None:
    spec = vit_spec(image_size=32, patch_size=8, vision_width=32, vision_heads=2, inputs=("image", "text"),
                    **TINY_TEXT, **TINY_HEADS)
    model = slip.create_model(spec)
    assert model.spec == spec and model.image_mlp is None
    save_model(model, tmp_path / "vit.pt")
    with pytest.raises(slip.checkpoint.CheckpointError,
                       match=r"vit\.pt: not a rn50 model: a ViT image tower where the named model has a "
                             r"ModifiedResNet$"):
        slip.create_model("rn50", pretrained=tmp_path / "vit.pt")
