"""Hugging Face transformers' `CLIPModel` directories to ours and back, exactly.

A transformers CLIP directory holds `config.json` (a `CLIPConfig`, model_type "clip") and `model.safetensors`
(or shards listed in `model.safetensors.index.json`); the pixel normalisation lives in
`preprocessor_config.json` and the tokenizer in `vocab.json` / `merges.txt` / `tokenizer.json`.

What maps exactly: our timm ViT in `openai_layout` (LayerNorm before the blocks, QuickGELU, LayerNorm eps
1e-5, no patch-embedding bias, class-token pooling) with our CLIP text tower. transformers'
`CLIPVisionModel` always has a pre-LayerNorm, a bias-free patch embedding, one activation and one LayerNorm
eps per tower config, so a SLIP-layout timm ViT, a ModifiedResNet or a model without text tower is refused
(ExportError), as is reading a config our towers cannot compute (another activation or eps, an MLP ratio
other than 4, ...: CheckpointError).

Key correspondence (ours <- transformers; "vm." is "vision_model.", "tm." is "text_model."):

    visual.cls_token [1,1,W]           <- vm.embeddings.class_embedding [W]
    visual.pos_embed [1,N+1,W]         <- vm.embeddings.position_embedding.weight [N+1,W]
    visual.patch_embed.proj.weight     <- vm.embeddings.patch_embedding.weight
    visual.norm_pre.* / visual.norm.*  <- vm.pre_layrnorm.* / vm.post_layernorm.*
    visual.blocks.i.attn.qkv.*         <- vm.encoder.layers.i.self_attn.{q,k,v}_proj.* (concatenated)
    visual.blocks.i.attn.proj / norm1 / norm2 / mlp.fc1 / mlp.fc2
                                <- ...self_attn.out_proj / layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2
    text.token_embedding.weight        <- tm.embeddings.token_embedding.weight
    text.positional_embedding          <- tm.embeddings.position_embedding.weight
    text.transformer.resblocks.i.attn.in_proj_{weight,bias}
                                       <- tm.encoder.layers.i.self_attn.{q,k,v}_proj.* (concatenated)
    ...attn.out_proj / ln_1 / ln_2 / mlp.c_fc / mlp.c_proj
                                <- ...self_attn.out_proj / layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2
    text.ln_final.*                    <- tm.final_layer_norm.*
    image_projection [W,E]             <- visual_projection.weight.T
    text_projection [Wt,E]             <- text_projection.weight.T
    logit_scale                        <- logit_scale (both the log of the scale)

Text pooling: our tower pools at the largest token id of each row (EOT, the last id of the vocabulary);
transformers pools at the first `eos_token_id`, or at the largest id when `eos_token_id == 2` (its legacy
configs). Export writes `eos_token_id = vocab_size - 1`, so both pool at the same position whenever each row
holds that id (our tokenizer's rows always do); reading accepts `eos_token_id` 2 or `vocab_size - 1` only.

Not carried by the format: transformers' CLIPModel does not clamp exp(logit_scale) at 100 as ours does (the
parameter is the same), and training-only settings (drop-path rate, logit scale init) are not recorded.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slip.checkpoint import CheckpointError, CheckpointInfo
from slip.checks import is_positive_int
from slip.error_text import named_one_line, one_line
from slip.inputs import IMAGE_TEXT
from slip.interop.common import Converted, ExportError, Exported, square_side
from slip.interop.hf_keys import from_hf_state, links, our_shapes, to_hf_state
from slip.interop.hf_tokenizer import check_vocabulary, hf_tokenizer_files
from slip.models import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTextModel, ModelSpec, Preprocess, ViTSpec,
                         vit_spec)

__all__ = ["HF_FORMAT", "SSL_HEAD_NOTE", "export_hf", "hf_tokenizer_files", "read_hf"]

HF_FORMAT = "hf-clip"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SSL_HEAD_NOTE = "the SSL head (image_mlp) has no place in a transformers CLIPModel and was left out"

LAYER_NORM_EPS = 1e-5  # both of our towers in OpenAI layout
MLP_RATIO = 4  # our builders' MLP width is 4x the tower width
LEGACY_ARGMAX_EOS = 2  # transformers pools at argmax(input_ids) when text_config.eos_token_id is 2
_PIL_RESAMPLE = {"bilinear": 2}  # CLIPImageProcessor's "resample" (a PIL filter) for our views' interpolation

# CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for config.json files that leave values out.
_TEXT_DEFAULTS: Mapping[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407,
)
_VISION_DEFAULTS: Mapping[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
_PROJECTION_DIM_DEFAULT = 512



# ----------------------------------------------------------------------------------------------------------
# slip -> transformers
# ----------------------------------------------------------------------------------------------------------

def _refuse(reason: str) -> ExportError:
    return ExportError(f"hf: {reason}; no file written")


def _check_expressible(model: ImageTextModel) -> None:
    """Raise ExportError naming the first piece of `model` that transformers' CLIPModel cannot express."""
    spec = model.spec
    if model.text is None:
        raise _refuse("the model has no text tower (an SSL-only objective), which a transformers CLIPModel "
                      "needs")
    if not isinstance(spec.vision, ViTSpec):
        raise _refuse(f"a {spec.vision.tower_name} image tower has no counterpart in transformers' CLIPModel, "
                      "whose CLIPVisionModel is a ViT")
    if not spec.vision.openai_layout:
        raise _refuse("a SLIP-layout timm ViT has no LayerNorm before its blocks and a patch bias, which "
                      "transformers' CLIPVisionModel cannot express")
    for tower_name, tower in (("visual", model.visual), ("text", model.text)):
        for name, module in tower.named_modules():
            if isinstance(module, nn.LayerNorm) and module.eps != LAYER_NORM_EPS:
                raise _refuse(f"{tower_name}.{name} has LayerNorm eps {module.eps:g}; the export writes "
                              f"{LAYER_NORM_EPS:g} for the whole tower")
    for index, block in enumerate(model.visual.blocks):
        act = type(getattr(block.mlp, "act", None)).__name__
        if act != "QuickGELU":
            raise _refuse(f"visual.blocks.{index}.mlp.act is {act}, but the exported config says quick_gelu")
        if block.attn.num_heads != spec.vision.heads:
            raise _refuse(f"visual.blocks.{index}.attn has {block.attn.num_heads} heads but the model spec "
                          f"says vision_heads={spec.vision.heads}")
    for index, block in enumerate(model.text.transformer.resblocks):
        if block.attn.heads != spec.text.heads:
            raise _refuse(f"text.transformer.resblocks.{index}.attn has {block.attn.heads} heads but the "
                          f"model spec says text_heads={spec.text.heads}")
    if getattr(model.visual, "global_pool", "token") != "token":
        raise _refuse(f"the ViT pools with {model.visual.global_pool!r}; transformers pools the class token")


def _checked_state(model: ImageTextModel) -> dict[str, torch.Tensor]:
    """`model`'s tensors, less the SSL head, after checking they are exactly what its spec builds."""
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("image_mlp.")}
    expected = our_shapes(model.spec)
    linked = {link[0] for link in links(model.spec)}
    for key in state:
        if key not in linked:
            raise _refuse(f"the model has {key}, which transformers' CLIPModel has no place for")
    for key in linked:
        if key not in state:
            raise _refuse(f"the model lacks {key}, which transformers' CLIPModel needs")
        if state[key].shape != expected[key]:
            raise _refuse(f"{key} has shape {list(state[key].shape)} but the model spec builds "
                          f"{list(expected[key])}")
    return state


def _hf_config(spec: ModelSpec, logit_scale: float, dtype: torch.dtype):
    from transformers import CLIPConfig

    text, vision, embed_dim = spec.text, spec.vision, spec.head.embed_dim
    vocab_size = text.vocab_size
    text_config = dict(
        vocab_size=vocab_size, hidden_size=text.width,
        intermediate_size=MLP_RATIO * text.width, num_hidden_layers=text.layers,
        num_attention_heads=text.heads, max_position_embeddings=text.context_length,
        hidden_act="quick_gelu", layer_norm_eps=LAYER_NORM_EPS,
        projection_dim=embed_dim,
        # Our tokenizer's EOT (pooled) and SOT are the last two ids of the vocabulary.
        eos_token_id=vocab_size - 1, bos_token_id=max(vocab_size - 2, 0),
    )
    vision_config = dict(
        hidden_size=vision.width, intermediate_size=MLP_RATIO * vision.width,
        num_hidden_layers=vision.layers, num_attention_heads=vision.heads, num_channels=3,
        image_size=spec.preprocess.image_size, patch_size=vision.patch_size, hidden_act="quick_gelu",
        layer_norm_eps=LAYER_NORM_EPS, projection_dim=embed_dim,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                      logit_scale_init_value=logit_scale, architectures=["CLIPModel"],
                      dtype=str(dtype).removeprefix("torch."))


def _preprocessor_config(preprocess: Preprocess) -> dict[str, Any]:
    """A CLIPImageProcessor config doing our eval view: shorter-side resize, centre crop, normalise with the
    model's mean/std."""
    size = preprocess.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": _PIL_RESAMPLE[preprocess.interpolation],
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
    }


def export_hf(model: ImageTextModel, out_dir: Path) -> Exported:
    """Write `model` as a directory that `transformers.CLIPModel.from_pretrained(out_dir)` loads, exactly.

    Writes config.json, model.safetensors, preprocessor_config.json (the model's pixel mean/std) and, when the
    model's vocabulary is our tokenizer's (49,408 tokens), the tokenizer files. Needs a text tower and a ViT
    in `openai_layout`; otherwise raises ExportError naming the missing piece before writing anything. The SSL
    head is left out (said in the notes).
    """
    _check_expressible(model)
    state = _checked_state(model)
    try:
        import safetensors.torch
        import transformers  # noqa: F401
    except ImportError as error:
        raise _refuse(f"{error.name} is not installed (pip install transformers safetensors)") from None
    from slip.tokenizer import VOCAB_SIZE

    spec = model.spec
    notes = [SSL_HEAD_NOTE] if model.image_mlp is not None else []
    hf_state = to_hf_state(state, spec)
    config = _hf_config(spec, float(model.logit_scale.detach()), model.logit_scale.dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    weights = out_dir / WEIGHTS_FILE
    safetensors.torch.save_file(hf_state, str(weights), metadata={"format": "pt"})
    preprocessor = out_dir / PREPROCESSOR_FILE
    preprocessor.write_text(json.dumps(_preprocessor_config(spec.preprocess), indent=2) + "\n", encoding="utf-8")
    files = [out_dir / CONFIG_FILE, weights, preprocessor]
    if spec.text.vocab_size == VOCAB_SIZE:
        files += hf_tokenizer_files(out_dir, spec.text.context_length)
    else:
        notes.append(f"no tokenizer files were written: the model's vocab_size={spec.text.vocab_size} is not "
                     f"slip's tokenizer's {VOCAB_SIZE}")
    return Exported(files=files, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# transformers -> slip
# ----------------------------------------------------------------------------------------------------------

def _side(value: Any, where: str, source: Path) -> int:
    """An image or patch size given as an int or a square [n, n]."""
    side = square_side(value)
    if side is None:
        raise CheckpointError(f"{source}: {where}={value!r} is not a positive int (or a square [n, n])")
    return side


def _vit_kwargs(config: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """`vit_spec`'s keywords for a CLIPConfig dict; CheckpointError where our towers cannot compute what it says."""
    sections = {}
    for name, defaults in (("text_config", _TEXT_DEFAULTS), ("vision_config", _VISION_DEFAULTS)):
        given, legacy = config.get(name) or {}, config.get(f"{name}_dict") or {}
        if not isinstance(given, Mapping) or not isinstance(legacy, Mapping):
            raise CheckpointError(f"{source}: {name} is not a JSON object")
        sections[name] = {**defaults, **given, **legacy}  # transformers lets <name>_dict override <name>
    text, vision = sections["text_config"], sections["vision_config"]

    def integer(section: str, key: str) -> int:
        value = sections[section][key]
        if not is_positive_int(value):
            raise CheckpointError(f"{source}: {section}.{key}={value!r} is not a positive int")
        return value

    for section, values in sections.items():
        if values["hidden_act"] != "quick_gelu":
            raise CheckpointError(f"{source}: {section}.hidden_act={values['hidden_act']!r}; slip's CLIP "
                                  "towers compute quick_gelu only")
        eps = values["layer_norm_eps"]
        if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9):
            raise CheckpointError(f"{source}: {section}.layer_norm_eps={eps!r}; slip's CLIP towers use "
                                  f"{LAYER_NORM_EPS:g}")
        width, heads = integer(section, "hidden_size"), integer(section, "num_attention_heads")
        if integer(section, "intermediate_size") != MLP_RATIO * width:
            raise CheckpointError(f"{source}: {section}.intermediate_size={values['intermediate_size']} is "
                                  f"not {MLP_RATIO} x hidden_size={width}, the only MLP ratio slip's towers "
                                  "have")
        if width % heads:
            raise CheckpointError(f"{source}: {section}.hidden_size={width} is not divisible by "
                                  f"num_attention_heads={heads}")
    if vision["num_channels"] != 3:
        raise CheckpointError(f"{source}: vision_config.num_channels={vision['num_channels']!r}; slip's "
                              "image towers take 3 channels")
    image_size = _side(vision["image_size"], "vision_config.image_size", source)
    patch_size = _side(vision["patch_size"], "vision_config.patch_size", source)
    if image_size % patch_size:
        raise CheckpointError(f"{source}: vision_config.image_size={image_size} is not a multiple of "
                              f"patch_size={patch_size}")
    vocab_size = integer("text_config", "vocab_size")
    eos = text["eos_token_id"]
    if eos not in (LEGACY_ARGMAX_EOS, vocab_size - 1) or isinstance(eos, bool):
        raise CheckpointError(f"{source}: text_config.eos_token_id={eos!r} is not the largest token id "
                              f"({vocab_size - 1}): transformers pools the text at that token, slip's text "
                              "tower at the largest id")
    embed_dim = config.get("projection_dim", _PROJECTION_DIM_DEFAULT)
    if not is_positive_int(embed_dim):
        raise CheckpointError(f"{source}: projection_dim={embed_dim!r} is not a positive int")
    return dict(
        openai_layout=True, image_size=image_size, patch_size=patch_size,
        vision_width=vision["hidden_size"], vision_layers=integer("vision_config", "num_hidden_layers"),
        vision_heads=vision["num_attention_heads"], embed_dim=embed_dim,
        text_width=text["hidden_size"], text_layers=integer("text_config", "num_hidden_layers"),
        text_heads=text["num_attention_heads"],
        context_length=integer("text_config", "max_position_embeddings"), vocab_size=vocab_size,
        inputs=IMAGE_TEXT,
    )


def _normalization(directory: Path) -> dict[str, tuple[float, ...]]:
    """image_mean / image_std from preprocessor_config.json (CLIPImageProcessor's defaults: OpenAI CLIP's)."""
    source = directory / PREPROCESSOR_FILE
    if not source.is_file():
        return {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    try:
        processor = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{source}: not readable JSON ({named_one_line(error)})") from None
    if not isinstance(processor, Mapping):
        raise CheckpointError(f"{source}: not a JSON object")
    if processor.get("do_normalize") is False:  # the model sees pixels in [0, 1] as they are
        return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    result = {}
    for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        value = processor.get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{source}: {key}={value!r} is not 3 numbers")
        result[key] = tuple(float(v) for v in value)
    if min(result["image_std"]) <= 0:
        raise CheckpointError(f"{source}: image_std={list(result['image_std'])} has a value <= 0")
    return result


def _load_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The directory's tensors (one model.safetensors, or the shards its index lists) and the file to name."""
    import safetensors.torch

    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        files, named = [single], single
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({named_one_line(error)})") from None
        named = index
    else:
        found = "; it holds pytorch_model.bin, which is not read (re-save it with save_pretrained)" \
            if (directory / "pytorch_model.bin").is_file() else ""
        raise CheckpointError(f"{single}: missing; a transformers CLIP directory needs its weights as "
                              f"safetensors{found}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(safetensors.torch.load_file(str(file)))
        except Exception as error:  # noqa: BLE001 - OSError, or safetensors' SafetensorError (an Exception)
            raise CheckpointError(f"{file}: not a readable safetensors file ({named_one_line(error)})") from None
    # position_ids are index buffers, not weights; older transformers versions saved them.
    return {key: value for key, value in state.items() if not key.endswith("embeddings.position_ids")}, named


def read_hf(path: Path) -> Converted | None:
    """A transformers CLIPModel directory (config.json + model.safetensors) in our terms; None for anything
    else.

    Raises CheckpointError (one line naming the file) for a CLIP directory whose config our towers cannot
    compute exactly, or whose weights do not match its config. Needs safetensors, not transformers.
    """
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, Mapping):
        return None
    model_type = config.get("model_type")
    if model_type in ("clip_text_model", "clip_vision_model"):
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is one CLIP tower; only a full "
                              "CLIPModel (model_type 'clip') converts")
    if model_type != "clip":
        return None
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:  # an optional extra
        raise CheckpointError(f"{config_path}: reading transformers weights needs safetensors: pip install "
                              "safetensors") from None
    check_vocabulary(directory)
    kwargs = {**_vit_kwargs(config, config_path), **_normalization(directory)}
    try:
        spec = vit_spec(**kwargs)
    except ValueError as error:  # a spec's check that the config checks above did not anticipate
        raise CheckpointError(f"{config_path}: {one_line(error)}") from None
    hf_state, source = _load_weights(directory)
    state = from_hf_state(hf_state, spec, source, config_path)
    return Converted(spec, state, CheckpointInfo(HF_FORMAT, "CLIPLoss"))
