"""load_pretrained on our own, original-SLIP and OpenAI-CLIP files, against the original implementations."""
from __future__ import annotations

import copy
import pathlib
import random

import pytest
import torch
from torch import nn

from slip.checkpoint import CheckpointError, CheckpointInfo, atomic_save, read_checkpoint, save_model
from slip.losses import ComposedObjective, SigLIPLoss, SimCLRLoss, Term
from slip.pretrained import load_pretrained, load_pretrained_with_info
from slip.models import (IMAGENET_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_resnet_model,
                         build_vit_model)
from checkpoint_helpers import (images, openai_resnet, openai_vit, original_slip_checkpoint, original_slip_parts,
                                perturb, save_openai_state_dict, save_openai_torchscript)

TINY_TEXT = dict(text_width=64, text_layers=2, text_heads=1, context_length=16, vocab_size=300)
RTOL = 1e-5


def assert_embeddings_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the embedding's scale (fp32)."""
    assert got.shape == want.shape
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale)


def tokens(vocab: int, context: int, batch: int = 3, seed: int = 2) -> torch.Tensor:
    """Caption-like rows: SOT, a few ids, EOT (the largest id, as in CLIP), zero padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(batch, context, dtype=torch.long)
    for row, length in enumerate([3, context - 2, 6][:batch]):
        rows[row, 0] = vocab - 2
        rows[row, 1 : length + 1] = torch.randint(1, vocab - 2, (length,), generator=gen)
        rows[row, length + 1] = vocab - 1
    return rows


# ---------------------------------------------------------------- own format


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                                embed_dim=32, ssl_mlp_dim=48, ssl_embed_dim=16, **TINY_TEXT),
        lambda: build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                                ssl_mlp_dim=48, ssl_embed_dim=16, inputs=("aug1", "aug2")),
        lambda: build_resnet_model(image_size=64, vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=32,
                                   inputs=("image", "text"), **TINY_TEXT),
    ],
    ids=["vit-slip", "vit-simclr", "resnet-clip"],
)
def test_own_format_round_trip(tmp_path: pathlib.Path, build) -> None:
    model = perturb(build()).eval()
    path = save_model(model, tmp_path / "model.pt")
    loaded = load_pretrained(path)
    assert not loaded.training
    assert loaded.spec == model.spec
    size = model.spec.preprocess.image_size
    batch = {k: images(size, seed=i) for i, k in enumerate(("image", "aug1", "aug2")) if k in model.inputs}
    if "text" in model.inputs:
        batch["text"] = tokens(TINY_TEXT["vocab_size"], TINY_TEXT["context_length"])
    with torch.no_grad():
        want, got = model(batch), loaded(batch)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def siglip_objective(bias: float) -> SigLIPLoss:
    """A SigLIP objective whose learned bias is `bias` (rounded to float32)."""
    objective = SigLIPLoss()
    with torch.no_grad():
        objective.logit_bias.fill_(bias)
    return objective


@pytest.mark.parametrize("make_objective, key", [
    (lambda: siglip_objective(-9.8765432), "logit_bias"),
    (lambda: ComposedObjective({"sig": Term(siglip_objective(-2.3456789)), "ssl": Term(SimCLRLoss(), 0.5)}),
     "objectives.sig.logit_bias"),
], ids=["siglip", "siglip-in-a-weighted-sum"])
def test_save_model_keeps_the_objectives_bias_bit_equal(tmp_path: pathlib.Path, make_objective, key: str) -> None:
    model = perturb(build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                                    embed_dim=32, inputs=("image", "text"), **TINY_TEXT)).eval()
    objective = make_objective()
    want = objective.state_dict()[key]
    path = save_model(model, tmp_path / "siglip.pt", objective)
    assert list(read_checkpoint(path)["objective"]) == [key]
    loaded, info = load_pretrained_with_info(path)
    assert torch.equal(torch.tensor(info.logit_bias).view(torch.int32), want.view(torch.int32))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_save_model_without_an_objective_writes_what_it_did_and_reports_no_bias(tmp_path: pathlib.Path) -> None:
    model = build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                            embed_dim=32, inputs=("image", "text"), **TINY_TEXT)
    path = save_model(model, tmp_path / "clip.pt")
    assert set(read_checkpoint(path)) == {"format", "format_version", "spec", "model"}
    assert load_pretrained_with_info(path)[1].logit_bias is None


def test_an_objective_entry_that_is_not_tensors_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    model = build_vit_model(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2,
                            embed_dim=32, inputs=("image", "text"), **TINY_TEXT)
    content = {"format": "slip", "format_version": 2, "spec": model.spec.to_dict(), "model": model.state_dict(),
               "objective": {"logit_bias": [1.0]}}
    atomic_save(content, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "odd.pt")
    assert str(error.value) == f'{tmp_path / "odd.pt"}: its "objective" entry is not a state dict of tensors'


# ---------------------------------------------------------------- OpenAI CLIP

def check_against_openai(loaded, reference: nn.Module, openai_clip, resolution: int) -> None:
    text = openai_clip.tokenize(["a photo of a cat", "", "x " * 100], truncate=True)
    pixels = images(resolution)
    with torch.no_grad():
        assert_embeddings_equal(loaded.encode_image(pixels), reference.encode_image(pixels))
        assert_embeddings_equal(loaded.encode_text(text), reference.encode_text(text))
        assert loaded({"image": pixels, "text": text})["logit_scale"].item() == pytest.approx(
            reference.logit_scale.exp().item(), rel=1e-6)


@pytest.mark.parametrize("make, resolution", [(openai_vit, 32), (openai_resnet, 64)], ids=["vit", "resnet"])
def test_openai_state_dict(tmp_path: pathlib.Path, openai_clip, make, resolution: int) -> None:
    reference = make(openai_clip)
    save_openai_state_dict(reference, tmp_path / "openai.pt", resolution)
    loaded, info = load_pretrained_with_info(tmp_path / "openai.pt")
    assert info == CheckpointInfo("openai-clip", "CLIPLoss")
    assert loaded.spec.preprocess.image_size == resolution and loaded.spec.text.width == 128
    assert loaded.spec.preprocess.mean == OPENAI_CLIP_MEAN and loaded.spec.preprocess.std == OPENAI_CLIP_STD
    check_against_openai(loaded, reference, openai_clip, resolution)


@pytest.mark.parametrize("make, resolution", [(openai_vit, 32), (openai_resnet, 64)], ids=["vit", "resnet"])
def test_openai_half_precision_state_dict(tmp_path: pathlib.Path, openai_clip, make, resolution: int) -> None:
    reference = make(openai_clip)
    half = copy.deepcopy(reference)
    openai_clip.model.convert_weights(half)  # what OpenAI did before releasing the weights
    torch.save(half.state_dict(), tmp_path / "half.pt")
    # The fp32 reference with the same (fp16-rounded) weights.
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    loaded = load_pretrained(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    check_against_openai(loaded, reference, openai_clip, resolution)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("make, resolution", [(openai_vit, 32), (openai_resnet, 64)], ids=["vit", "resnet"])
def test_openai_torchscript_archive(tmp_path: pathlib.Path, openai_clip, make, resolution: int) -> None:
    reference = make(openai_clip)
    save_openai_torchscript(reference, tmp_path / "openai_jit.pt", resolution, openai_clip)
    loaded, info = load_pretrained_with_info(tmp_path / "openai_jit.pt")
    assert info.format == "openai-clip"
    check_against_openai(loaded, reference, openai_clip, resolution)


# ---------------------------------------------------------------- original SLIP


@pytest.mark.parametrize("objective", ["SLIP", "CLIP", "SIMCLR"])
def test_original_slip_checkpoint(tmp_path: pathlib.Path, openai_clip, objective: str) -> None:
    parts = original_slip_parts(openai_clip, objective)
    torch.save(original_slip_checkpoint(parts, f"{objective}_VITS16"), tmp_path / "checkpoint_best.pt")
    loaded, info = load_pretrained_with_info(tmp_path / "checkpoint_best.pt")
    expected_objective = {"SLIP": "SLIPLoss", "CLIP": "CLIPLoss", "SIMCLR": "SimCLRLoss"}[objective]
    assert info == CheckpointInfo("slip-original", expected_objective)
    assert loaded.spec.vision.heads == 12 and loaded.spec.vision.width == 384
    assert loaded.spec.preprocess.mean == IMAGENET_MEAN  # SLIP trained with ImageNet statistics
    pixels = images(64)
    with torch.no_grad():
        features = parts["visual"](pixels)
        assert_embeddings_equal(loaded.image_features(pixels), features)
        if "clip" in parts:
            text = openai_clip.tokenize(["a small red circle", "two dogs on a beach at sunset"])
            assert_embeddings_equal(loaded.encode_image(pixels), features @ parts["image_projection"])
            assert_embeddings_equal(loaded.encode_text(text), parts["clip"].encode_text(text))
        else:
            assert loaded.text is None
        if "image_mlp" in parts:
            out = loaded({"aug1": pixels, "aug2": pixels.flip(-1)})
            assert_embeddings_equal(out["aug1_embed"], parts["image_mlp"](features))
            assert_embeddings_equal(out["aug2_embed"], parts["image_mlp"](parts["visual"](pixels.flip(-1))))
        else:
            assert loaded.image_mlp is None


# ---------------------------------------------------------------- security and bad input


class WritesAFile:
    """Unpickling this calls Path.touch: what a malicious checkpoint would do."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "pwned"
    payload = {"state_dict": {"module.x": torch.zeros(1)}, "args": WritesAFile(target)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt.*refused"):
        load_pretrained(tmp_path / "evil.pt")
    assert not target.exists()
    # The payload is live: an unsafe load does run it (so the check above can fail).
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert target.exists()


def one_line_error(path: pathlib.Path, error: type[Exception] = CheckpointError) -> str:
    with pytest.raises(error) as info:
        load_pretrained(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path: pathlib.Path) -> None:
    assert "no such" in one_line_error(tmp_path / "nope.pt", FileNotFoundError)


@pytest.mark.parametrize("prefix", [b"", b"\x80\x02", b"\x80\x02\x8a\x0a"], ids=["raw", "pickle", "legacy-magic"])
def test_garbage_bytes(tmp_path: pathlib.Path, prefix: bytes) -> None:
    """Random bytes, and random bytes after a pickle header (so the legacy unpickler reads on): one clean error."""
    for seed in range(100):
        (tmp_path / "garbage.pt").write_bytes(prefix + random.Random(seed).randbytes(1000))
        one_line_error(tmp_path / "garbage.pt")


def test_unrelated_dict(tmp_path: pathlib.Path) -> None:
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert "not a slip" in one_line_error(tmp_path / "other.pt")


def test_unknown_slip_model_name(tmp_path: pathlib.Path, openai_clip) -> None:
    checkpoint = original_slip_checkpoint(original_slip_parts(openai_clip, "SIMCLR"), "MOCO_VITS16")
    torch.save(checkpoint, tmp_path / "moco.pt")
    assert "MOCO_VITS16" in one_line_error(tmp_path / "moco.pt")


def test_weights_that_do_not_fit(tmp_path: pathlib.Path, openai_clip) -> None:
    checkpoint = original_slip_checkpoint(original_slip_parts(openai_clip, "SIMCLR"), "SIMCLR_VITS16")
    del checkpoint["state_dict"]["module.image_mlp.bn1.running_mean"]
    torch.save(checkpoint, tmp_path / "partial.pt")
    assert "bn1.running_mean" in one_line_error(tmp_path / "partial.pt")


def test_failed_save_keeps_previous_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
