"""slip <-> Hugging Face transformers CLIPModel: exact conversion both ways, refusals, and the tokenizer.

Every model is tiny, float32, on CPU, with all parameters (LayerNorms included) randomised, so a wrong key
mapping cannot hide behind a default initialisation. Nothing is downloaded: transformers models are built from
configs.
Run with `pytest -s` to see the measured differences.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import safetensors.torch  # noqa: E402
import transformers  # noqa: E402

from slip.checkpoint import CheckpointError  # noqa: E402
from slip.interop.common import ExportError  # noqa: E402
from slip.interop.hf import SSL_HEAD_NOTE, export_hf, read_hf  # noqa: E402
from slip.models import (  # noqa: E402
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_model, build_resnet_model, build_vit_model,
)
from slip.tokenizer import tokenize  # noqa: E402

TOLERANCE = 1e-5
SMALL_VOCAB = 64
CONTEXT = 16
CAPTIONS = [
    "a photo of a cat",
    "Two dogs playing in the snow!",
    "It's 3 o'clock, isn't it?",
    "  a naïve café in MÜNCHEN\tat night  ",
    "a diagram: x=1, y=22; (z)",
]


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.3^2) from a seeded generator (LayerNorm weights and biases too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.3, generator=generator)
    return module.eval()


def tiny_vit(seed: int = 0, vocab_size: int = SMALL_VOCAB, **overrides):
    kwargs = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                  openai_layout=True, embed_dim=32, text_width=64, text_layers=2, text_heads=2,
                  context_length=CONTEXT, vocab_size=vocab_size, inputs=("image", "text"),
                  image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    kwargs.update(overrides)
    return randomize(build_vit_model(**kwargs), seed)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def token_rows(vocab_size: int = SMALL_VOCAB, seed: int = 2) -> torch.Tensor:
    """Rows laid out as our tokenizer does: SOT = vocab-2, ids below it, EOT = vocab-1 (largest id), zeros."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(4, CONTEXT, dtype=torch.long)
    for row, length in enumerate((3, 7, 12, CONTEXT - 2)):
        rows[row, 0] = vocab_size - 2
        rows[row, 1:1 + length] = torch.randint(0, vocab_size - 2, (length,), generator=generator)
        rows[row, 1 + length] = vocab_size - 1
    return rows


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float((ours - theirs).abs().max() / ours.abs().max())


def pooled(output) -> torch.Tensor:
    """transformers 5.x get_*_features return a BaseModelOutputWithPooling; its pooler_output is projected."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def encoding_differences(model, hf_model) -> tuple[float, float]:
    """(image, text) relative differences between our encodings and transformers' projected features."""
    x, tokens = images(), token_rows()
    with torch.no_grad():
        image = relative_difference(model.encode_image(x), pooled(hf_model.get_image_features(pixel_values=x)))
        text = relative_difference(model.encode_text(tokens), pooled(hf_model.get_text_features(input_ids=tokens)))
    return image, text


def files_in(directory) -> list:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


def test_export_loads_in_transformers_with_the_same_encodings(tmp_path):
    model = tiny_vit(seed=10)
    exported = export_hf(model, tmp_path / "hf")
    assert {p.name for p in exported.files} == {"config.json", "model.safetensors",
                                                "preprocessor_config.json"}
    assert all(p.is_file() for p in exported.files)
    assert SSL_HEAD_NOTE not in exported.notes
    assert any("vocab_size=64" in note for note in exported.notes)  # no tokenizer for a 64-token vocabulary

    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.text_config.eos_token_id == SMALL_VOCAB - 1
    image_diff, text_diff = encoding_differences(model, hf_model)
    print(f"\nslip -> transformers: image max rel diff {image_diff:.2e}, text max rel diff {text_diff:.2e}")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE
    assert torch.equal(hf_model.logit_scale.detach(), model.logit_scale.detach())

    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.4, 0.3] and processor["image_std"] == [0.2, 0.25, 0.3]
    assert processor["crop_size"] == {"height": 32, "width": 32}


def test_preprocessor_config_loads_as_clip_image_processor(tmp_path):
    export_hf(tiny_vit(seed=11), tmp_path)
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == pytest.approx([0.5, 0.4, 0.3])
    assert list(processor.image_std) == pytest.approx([0.2, 0.25, 0.3])
    pixels = processor(images=[torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)],
                       return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def hf_config(eos_token_id: int = SMALL_VOCAB - 1, **text_overrides) -> transformers.CLIPConfig:
    text = dict(vocab_size=SMALL_VOCAB, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=3, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
                eos_token_id=eos_token_id, bos_token_id=SMALL_VOCAB - 2)
    text.update(text_overrides)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.mark.parametrize("eos_token_id", [SMALL_VOCAB - 1, 2], ids=["eos-last-id", "legacy-argmax"])
def test_transformers_directory_reads_with_the_same_encodings(tmp_path, eos_token_id):
    hf_model = randomize(transformers.CLIPModel(hf_config(eos_token_id)), seed=20)
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    converted = read_hf(tmp_path)
    assert converted is not None
    assert converted.info.format == "hf-clip" and converted.info.objective == "CLIPLoss"
    assert converted.spec.vision.heads == 4 and converted.spec.text.heads == 3
    assert converted.spec.preprocess.mean == (0.1, 0.2, 0.3) and converted.spec.preprocess.std == (0.4, 0.5, 0.6)
    model = build_model(converted.spec)
    model.load_state_dict(converted.state, strict=True)
    model.eval()

    image_diff, text_diff = encoding_differences(model, hf_model)
    print(f"\ntransformers -> slip (eos {eos_token_id}): image max rel diff {image_diff:.2e}, "
          f"text max rel diff {text_diff:.2e}")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE
    assert torch.equal(model.logit_scale.detach(), hf_model.logit_scale.detach())


def test_directory_without_preprocessor_gets_openai_normalization(tmp_path):
    randomize(transformers.CLIPModel(hf_config()), seed=21).save_pretrained(tmp_path)
    converted = read_hf(tmp_path)
    assert converted.spec.preprocess.mean == OPENAI_CLIP_MEAN and converted.spec.preprocess.std == OPENAI_CLIP_STD


def test_round_trip_is_exact(tmp_path):
    model = tiny_vit(seed=30)
    export_hf(model, tmp_path)
    converted = read_hf(tmp_path)
    assert type(converted.spec.vision) is type(model.spec.vision)
    sizes = converted.spec.sizes()
    for key in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "embed_dim",
                "text_width", "text_layers", "text_heads", "context_length", "vocab_size", "openai_layout",
                "image_mean", "image_std"):
        assert sizes[key] == model.spec.sizes()[key], key
    ours = model.state_dict()
    assert set(converted.state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(converted.state[key], value), key
    rebuilt = build_model(converted.spec)
    rebuilt.load_state_dict(converted.state, strict=True)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind, piece", [
    ("resnet", "ModifiedResNet"),
    ("slip-vit", "SLIP-layout timm ViT"),
    ("ssl-only", "no text tower"),
])
def test_inexpressible_models_are_refused_without_writing(tmp_path, kind, piece):
    if kind == "resnet":
        model = build_resnet_model(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=32,
                                   text_width=32, text_layers=1, text_heads=1, context_length=8,
                                   vocab_size=64, inputs=("image", "text"))
    elif kind == "slip-vit":
        model = tiny_vit(openai_layout=False)
    else:
        model = tiny_vit(inputs=("aug1", "aug2"), ssl_mlp_dim=32, ssl_embed_dim=16)
    out_dir = tmp_path / "out"
    with pytest.raises(ExportError) as error:
        export_hf(model, out_dir)
    message = one_line(error)
    assert message.startswith("hf: ") and piece in message and "no file written" in message
    assert files_in(out_dir) == []


def test_slip_model_exports_without_its_ssl_head(tmp_path):
    model = tiny_vit(seed=40, inputs=("image", "text", "aug1", "aug2"), ssl_mlp_dim=32, ssl_embed_dim=16)
    assert model.image_mlp is not None
    exported = export_hf(model, tmp_path)
    assert SSL_HEAD_NOTE in exported.notes
    written = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith("image_mlp") for key in written)
    converted = read_hf(tmp_path)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith("image_mlp.")}
    assert set(converted.state) == set(expected)
    assert all(torch.equal(converted.state[key], value) for key, value in expected.items())
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        diff = relative_difference(model.encode_image(images()),
                                   pooled(hf_model.get_image_features(pixel_values=images())))
    assert diff < TOLERANCE


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, damage):
    export_hf(tiny_vit(seed=50), tmp_path)
    weights_path = tmp_path / "model.safetensors"
    weights = safetensors.torch.load_file(weights_path)
    key = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    if damage == "missing":
        del weights[key]
    elif damage == "extra":
        key = "vision_model.encoder.layers.2.mlp.fc1.bias"
        weights[key] = torch.zeros(256)
    else:
        weights[key] = torch.zeros(65)
    safetensors.torch.save_file(weights, weights_path)
    with pytest.raises(CheckpointError) as error:
        read_hf(tmp_path)
    message = one_line(error)
    assert str(weights_path) in message and key in message
    assert {"missing": "missing weight", "extra": "unexpected weight", "shape": "[65]"}[damage] in message


def test_config_that_slip_cannot_compute_is_refused(tmp_path):
    hf_model = transformers.CLIPModel(hf_config(hidden_act="gelu"))
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as error:
        read_hf(tmp_path)
    message = one_line(error)
    assert str(tmp_path / "config.json") in message and "hidden_act='gelu'" in message


def test_clip_config_without_safetensors_weights_is_refused(tmp_path):
    export_hf(tiny_vit(seed=51), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        read_hf(tmp_path)
    assert str(tmp_path / "model.safetensors") in one_line(error)


def test_anything_else_is_not_a_transformers_clip_directory(tmp_path):
    assert read_hf(tmp_path) is None  # an empty directory: no config.json
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert read_hf(tmp_path) is None  # weights but no config.json
    assert read_hf(tmp_path / "model.safetensors") is None  # a file, not a directory
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert read_hf(tmp_path) is None


def test_transformers_tokenizer_from_our_merges_gives_our_ids(tmp_path):
    """The exported tokenizer files load as transformers' CLIPTokenizer and give our ids.

    Compared: HF's unpadded ids against our row up to and including EOT (HF pads with EOT = 49407 where we
    pad with 0, so padded rows differ after the first EOT; both text towers pool at the first EOT). HF's
    normaliser is NFC + whitespace collapse + lower-case, ours adds ftfy and HTML unescaping, so captions with
    HTML entities or mojibake could differ; these captions have neither.
    """
    model = tiny_vit(seed=60, vocab_size=49408)
    exported = export_hf(model, tmp_path)
    names = {p.name for p in exported.files}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    assert not any("tokenizer" in note for note in exported.notes)
    long_caption = " ".join(["word"] * 40)

    def check(hf_tokenizer):
        for caption in CAPTIONS:
            ids = hf_tokenizer(caption)["input_ids"]
            assert ids == tokenize(caption, context_length=77)[0, :len(ids)].tolist(), caption
            assert ids[-1] == 49407
        truncated = hf_tokenizer(long_caption, truncation=True)["input_ids"]  # model_max_length = context
        assert truncated == tokenize(long_caption, context_length=CONTEXT)[0].tolist()

    check(transformers.CLIPTokenizer.from_pretrained(tmp_path))
    (tmp_path / "tokenizer.json").unlink()  # built from vocab.json + merges.txt alone
    check(transformers.CLIPTokenizer.from_pretrained(tmp_path))

    # End to end: transformers' tokenizer and model against ours, HF padding included.
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    hf_ids = hf_tokenizer(CAPTIONS, padding="max_length", max_length=CONTEXT, truncation=True,
                          return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = relative_difference(model.encode_text(tokenize(CAPTIONS, context_length=CONTEXT)),
                                   pooled(hf_model.get_text_features(input_ids=hf_ids)))
    print(f"\nHF tokenizer + model vs ours, full vocabulary: text max rel diff {diff:.2e}")
    assert diff < TOLERANCE


def test_a_directory_whose_vocabulary_is_not_ours_is_refused_naming_the_first_mismatch(tmp_path):
    export_hf(tiny_vit(seed=61, vocab_size=49408), tmp_path)
    assert read_hf(tmp_path) is not None  # our own vocabulary reads
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    first, second = [token for token, index in vocab.items() if index in (300, 301)]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: another tokenizer's numbering
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        read_hf(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'vocab.json'}: not slip's CLIP vocabulary: id 300 is ")
    assert "\n" not in message
