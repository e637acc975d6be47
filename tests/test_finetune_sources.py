"""Every checkpoint format slip.load_pretrained reads loads into the fine-tuner: the classifier's tower is the
checkpoint's image tower to the bit, and it trains; a converted file runs `python -m slip.finetune` end to end."""
from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from slip.app.evaluate import default_output_dir
from slip.app.finetune import finetune
from slip.checkpoint import save_model
from slip.classifier import ImageClassifier, classifier_from_model, layer_decay_groups
from slip.interop.safetensors_io import save_safetensors
from slip.models import ImageTextModel, tiny
from slip.pretrained import load_pretrained, load_pretrained_with_info
from checkpoint_helpers import (openai_resnet, openai_vit, original_slip_checkpoint, original_slip_parts, perturb,
                                save_openai_state_dict, save_openai_torchscript)
from train_helpers import CONF_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5
# Writes a checkpoint of one format in the given directory (the OpenAI reference module at hand); returns its path.
Writer = Callable[[Path, types.ModuleType], Path]


def tiny_model(openai_layout: bool = False) -> ImageTextModel:
    """slip's CPU-sized ViT (conf/model/tiny.yaml), every weight moved off its initial value, in eval mode; in
    OpenAI's layout (what open_clip and transformers can hold) as an image-text model."""
    torch.manual_seed(0)
    model = tiny(openai_layout=True, inputs=("image", "text")) if openai_layout else tiny()
    return perturb(model).eval()


def write_own(directory: Path, openai_clip: types.ModuleType) -> Path:
    """Our own .pt, as slip.checkpoint.save_model writes it."""
    return save_model(tiny_model(), directory / "model.pt")


def write_original_slip(directory: Path, openai_clip: types.ModuleType) -> Path:
    """A checkpoint of the original SLIP code (SLIP_VITS16: ViT-S/16 at 64 px, CLIP text tower, SSL head)."""
    torch.save(original_slip_checkpoint(original_slip_parts(openai_clip, "SLIP"), "SLIP_VITS16"),
               directory / "checkpoint_best.pt")
    return directory / "checkpoint_best.pt"


def write_openai_state_dict(directory: Path, openai_clip: types.ModuleType) -> Path:
    """An OpenAI CLIP state dict of a ViT model, as OpenAI released theirs."""
    return save_openai_state_dict(openai_vit(openai_clip), directory / "ViT.pt", 32)


def write_openai_resnet_state_dict(directory: Path, openai_clip: types.ModuleType) -> Path:
    """An OpenAI CLIP state dict of a ModifiedResNet model (BatchNorm, attention pool)."""
    return save_openai_state_dict(openai_resnet(openai_clip), directory / "RN.pt", 64)


def write_openai_torchscript(directory: Path, openai_clip: types.ModuleType) -> Path:
    """An OpenAI CLIP TorchScript archive of a ViT model, as OpenAI released theirs."""
    return save_openai_torchscript(openai_vit(openai_clip), directory / "ViT-jit.pt", 32, openai_clip)


def write_open_clip(directory: Path, openai_clip: types.ModuleType) -> Path:
    """An open_clip model directory, as slip.interop.open_clip.export_open_clip writes it."""
    from slip.interop.open_clip import export_open_clip

    export_open_clip(tiny_model(openai_layout=True), directory / "open_clip")
    return directory / "open_clip"


def write_transformers(directory: Path, openai_clip: types.ModuleType) -> Path:
    """A transformers CLIPModel directory, as slip.interop.hf.export_hf writes it."""
    pytest.importorskip("transformers")
    from slip.interop.hf import export_hf

    export_hf(tiny_model(openai_layout=True), directory / "hf")
    return directory / "hf"


def write_safetensors(directory: Path, openai_clip: types.ModuleType) -> Path:
    """A safetensors file, as `python -m slip.export --to safetensors` writes it."""
    pytest.importorskip("safetensors")
    return save_safetensors(tiny_model(), directory / "model.safetensors")


FORMATS: dict[str, Writer] = {
    "own": write_own,
    "slip-original": write_original_slip,
    "openai-state-dict": write_openai_state_dict,
    "openai-state-dict-resnet": write_openai_resnet_state_dict,
    "openai-torchscript": write_openai_torchscript,
    "open_clip": write_open_clip,
    "transformers": write_transformers,
    "safetensors": write_safetensors,
}


def assert_one_step_trains_every_depth(classifier: ImageClassifier, image_size: int) -> None:
    """One AdamW step over `layer_decay_groups` (each group's lr scaled by its lr_scale, as the fine-tuner's
    schedule does) on a random batch under cross-entropy: every parameter gets a finite gradient, a tower weight
    changes at every depth (every lr_scale of a tower group), the bottom one, with the smallest lr, included, and
    the head changes."""
    groups = layer_decay_groups(classifier, 0.05, 0.65)
    for group in groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups)
    names = {id(param): name for name, param in classifier.named_parameters()}
    before = {name: param.detach().clone() for name, param in classifier.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, classifier.num_classes, (4,), generator=generator)
    classifier.train()
    loss = F.cross_entropy(classifier(pixels), labels)
    loss.backward()
    assert loss.isfinite()
    for name, param in classifier.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
    optimizer.step()
    changed_at: dict[float, list[str]] = {}
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            if name.startswith("tower.") and not torch.equal(param.detach(), before[name]):
                changed_at.setdefault(group["lr_scale"], []).append(name)
    scales = {group["lr_scale"] for group in groups
              if any(names[id(param)].startswith("tower.") for param in group["params"])}
    assert len(scales) > 2 and set(changed_at) == scales, (sorted(scales), sorted(changed_at))
    assert not torch.equal(classifier.head.weight.detach(), before["head.weight"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("write", FORMATS.values(), ids=FORMATS.keys())
def test_every_checkpoint_format_loads_into_the_finetuner(write: Writer, tmp_path: Path,
                                                          openai_clip: types.ModuleType) -> None:
    model = load_pretrained(write(tmp_path, openai_clip))
    classifier = classifier_from_model(model, num_classes=NUM_CLASSES)
    want, got = model.visual.state_dict(), classifier.tower.state_dict()
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert classifier.head.out_features == NUM_CLASSES and classifier.head.in_features == classifier.tower.num_features
    assert_one_step_trains_every_depth(classifier, model.spec.preprocess.image_size)


def test_finetune_runs_end_to_end_from_a_safetensors_file(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    path = save_safetensors(tiny_model(), tmp_path / "pretrained" / "model.safetensors")
    size = load_pretrained(path).spec.preprocess.image_size
    catalog = [f"catalog.synthetic.{split}.{key}={value}" for split, samples in (("train", 48), ("test", 24))
               for key, value in (("num_samples", samples), ("image_size", size))]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=[
            f"checkpoint={path}", f"output_root={tmp_path / 'runs'}", "trainer.max_steps=2",
            "trainer.log_images=false", "trainer.device=cpu", "trainer.save_every=0", "data.batch_size=8",
            "data.num_workers=0",
            "mixup=null", *catalog])
    results = finetune(cfg)
    assert results["step"] == 2 and results["finished"] and results["validation"] == "done"
    assert results["source"]["format"] == load_pretrained_with_info(path)[1].format
    assert set(results["test"]) >= {"top1", "top5"} and 0 <= results["test"]["top1"] <= 100
    records_file = default_output_dir(path) / "finetune.json"
    assert records_file == tmp_path / "pretrained" / "model.safetensors.eval" / "finetune.json"
    records = json.loads(records_file.read_text())["records"]
    assert {record["metric"]: record["value"] for record in records} == results["test"]
    assert {record["dataset"] for record in records} == {"synthetic"}
    assert all(record["checkpoint"] == str(path.resolve()) for record in records)
