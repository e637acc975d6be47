"""The Python API: models by name (with weights), their transforms and tokenizer, zero-shot classifiers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import slip
from slip.checkpoint import CheckpointError, save_model
from slip.app.config import build
from slip.data.synthetic import photo_like
from slip.models import MODEL_BUILDERS
from slip.tokenizer import tokenize
from train_helpers import CONF_DIR, compose_config

MODEL_CONFIGS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_is_a_name_that_builds_the_same_architecture(name: str) -> None:
    cfg = compose_config(f"model={name}")
    with torch.device("meta"):
        from_config = build(cfg.model, "model")
        from_name = slip.create_model(name, **{k: v for k, v in cfg.model.items() if k != "_target_"})
    assert name in slip.model_names() and from_name.spec == from_config.spec


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_a_pretrained_model_by_name_has_the_saved_weights_and_the_name_is_checked(tmp_path: Path) -> None:
    saved = randomized(slip.create_model("tiny", inputs=("image", "text")))
    save_model(saved, tmp_path / "tiny.pt")
    loaded = slip.create_model("tiny", pretrained=tmp_path / "tiny.pt")
    assert not loaded.training and loaded.image_mlp is None
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"tiny\.pt: not a vit_ti16 model: context_length=32 where the named "
                                              r"model has 77$"):
        slip.create_model("vit_ti16", pretrained=tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="unknown model name 'vit_xl'; known: build_resnet_model"):
        slip.create_model("vit_xl")


def test_the_transforms_are_those_the_model_config_implies() -> None:
    model, train_transform, eval_transform = slip.create_model_and_transforms("rn50", image_size=64)
    image = photo_like(120, 90, seed=3)
    mean, std = model.spec.preprocess.mean, model.spec.preprocess.std
    reference = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(64), v2.PILToTensor(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    torch.testing.assert_close(eval_transform(image), reference(image), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    crop = train_transform(image)
    assert crop.shape == (3, 64, 64) and mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_the_tokenizer_takes_the_models_context_length() -> None:
    tiny = slip.get_tokenizer("tiny")
    assert tiny.context_length == 32 and slip.get_tokenizer().context_length == 77
    ids = tiny(["a small red circle", "a photo"])
    assert torch.equal(ids, tokenize(["a small red circle", "a photo"], 32))
    assert tiny.decode(ids[0]) == "a small red circle"


def test_the_zero_shot_classifier_is_clips_rule_computed_plainly() -> None:
    model = randomized(slip.create_model("tiny", inputs=("image", "text")))
    classes = ["cat", ["dog", "puppy"], "car"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classifier = slip.zero_shot_classifier(model, classes, templates)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows = []
        for names in (["cat"], ["dog", "puppy"], ["car"]):
            prompts = [template.format(name) for name in names for template in templates]
            text = F.normalize(model.encode_text(tokenize(prompts, 32)), dim=-1)
            rows.append(F.normalize(text.mean(dim=0), dim=0))
        want = 100 * F.normalize(model.encode_image(images), dim=-1) @ torch.stack(rows).T
    torch.testing.assert_close(classifier(images), want, atol=1e-4, rtol=1e-5)
    assert classifier.class_names == ["cat", "dog", "car"]
    assert classifier.predict(images) == [classifier.class_names[i] for i in want.argmax(dim=-1).tolist()]


def test_safetensors_keep_every_tensor_and_the_arch_without_pickle(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    model = randomized(slip.create_model("tiny"))  # with the SSL head
    path = slip.save_safetensors(model, tmp_path / "model.safetensors")
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "slip-safetensors" and "image_mlp.layer1.weight" in handle.keys()
    loaded = slip.load_pretrained(path)
    assert loaded.spec == model.spec
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors: a safetensors file without slip's metadata"):
        slip.load_pretrained(foreign)


def test_a_directory_of_no_known_format_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as info:
        slip.load_pretrained(tmp_path / "weights")
    assert str(info.value).startswith(f"{tmp_path / 'weights'}: a directory that is no transformers CLIP")
    assert "notes.txt" in str(info.value) and "\n" not in str(info.value)


def test_every_named_preset_is_a_model_config() -> None:
    """`model=<name>` works for every preset `slip.model_names()` lists (beside them: the two family builders)."""
    assert sorted(MODEL_BUILDERS) == MODEL_CONFIGS
    assert set(slip.model_names()) == set(MODEL_BUILDERS) | {"build_vit_model", "build_resnet_model"}
