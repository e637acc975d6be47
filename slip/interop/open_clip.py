"""open_clip's model directories (`open_clip_config.json` + weights, as its hub repos hold them) to ours and back.

Export writes what `open_clip.create_model("local-dir:<dir>")` builds and loads strictly:
- a ViT in `openai_layout` or a ModifiedResNet: open_clip's own towers in OpenAI CLIP's key layout, `quick_gelu`;
- a SLIP-layout timm ViT: open_clip's `TimmModel` tower, which builds its trunk by registered timm name only
  (open_clip passes no size arguments to timm), so the model exports only where a registered name builds exactly
  our tower (e.g. `vit_ti16` at 224 px is `vit_tiny_patch16_224`); otherwise ExportError.

SigLIP's learned logit bias, which our objective holds, goes where open_clip keeps it: the model's `logit_bias`
parameter, with `init_logit_bias` in the config; reading gives it back beside the model
(`Converted.objective_state`).

Reading needs neither open_clip nor a network: a config our models cannot express, or weights that do not fit it,
raise CheckpointError with one line naming the file and the first offending key.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from slip.checkpoint import CheckpointError, CheckpointInfo
from slip.checks import is_positive_int
from slip.error_text import first_line
from slip.inputs import IMAGE_TEXT
from slip.interop.common import (Converted, ExportError, Exported, prefix_text_keys,
                                 square_side, unprefix_text_keys)
from slip.interop.openai import from_openai, openai_vit_key_to_ours, to_openai
from slip.interop.timm_trunks import first_difference, structure, timm_name_for, timm_trunk
from slip.models import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTextModel, ModelSpec, ResNetSpec, ViTSpec,
                         build_model, resnet_spec, vit_spec)
from slip.models.vision import vit_tower

__all__ = ["CONFIG_NAME", "SSL_HEAD_NOTE", "TEXT_CFG_DEFAULTS", "VISION_CFG_DEFAULTS", "WEIGHT_NAMES",
           "export_open_clip", "read_open_clip", "timm_name_for"]

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# The weight files open_clip looks for in a model directory, in its order of preference.
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
SSL_HEAD_NOTE = "the SSL head (image_mlp) has no place in an open_clip model and was left out"
OPEN_CLIP_INFO = CheckpointInfo("open_clip", "CLIPLoss")
LOGIT_BIAS_KEY = "logit_bias"  # open_clip's CLIP parameter, present where model_cfg sets init_logit_bias

# open_clip 3.3.0's CLIPVisionCfg / CLIPTextCfg defaults: what a config means by leaving a key out.
VISION_CFG_DEFAULTS: Mapping[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "attn_pooler_queries": 256,
    "attn_pooler_heads": 8, "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "pool_type": "tok", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None, "timm_model_pretrained": False,
    "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0, "timm_drop_path": None,
}
TEXT_CFG_DEFAULTS: Mapping[str, Any] = {
    "context_length": 77, "vocab_size": 49408, "hf_tokenizer_name": None, "tokenizer_mode": None,
    "tokenizer_kwargs": None, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0, "ls_init_value": None,
    "embed_cls": False, "pad_id": 0, "eos_id": 2, "no_causal_mask": False, "final_ln_after_pool": False,
    "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
    "hf_model_pretrained": True, "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler",
}
_MODEL_CFG_DEFAULTS: Mapping[str, Any] = {
    "quick_gelu": False, "init_logit_scale": math.log(1 / 0.07), "init_logit_bias": None,
    "nonscalar_logit_scale": False, "output_dict": False, "custom_text": False,
}

Rule = tuple[Callable[[Any], bool], str]  # (does this value fit our models, why not)

_ANY: Rule = (lambda v: True, "")
_SIZE: Rule = (is_positive_int, "a positive integer is needed")
_SQUARE: Rule = (lambda v: square_side(v) is not None, "our towers take square images and patches")
_OFF: Rule = (lambda v: not v, "our towers have no such part")
_MLP4: Rule = (lambda v: v == 4, "our towers' MLPs are 4x wide")
_NO_KWARGS: Rule = (lambda v: not v, "our towers use the standard activation")
_EPS_1E5: Rule = (lambda v: not v or v == {"eps": 1e-5}, "our CLIP-layout towers use LayerNorm eps 1e-5")
_DEFAULT_BLOCK: Rule = (lambda v: v in (None, "default"), "our towers use the standard residual block")

_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# Keys every image tower accepts whatever their value: training-time only (dropouts), outputs we do not use, or
# settings of a tower kind the config does not select.
_VISION_FREE = ("patch_dropout", "output_tokens", "timm_model_pretrained", "timm_drop", "attn_pooler_queries",
                "attn_pooler_heads")
_VIT_ONLY = ("mlp_ratio", "patch_size", "ls_init_value", "attentional_pool", "no_ln_pre", "pos_embed_type",
             "final_ln_after_pool", "pool_type", "act_kwargs", "norm_kwargs", "block_type", *_CUSTOM_BLOCK)
_TIMM_ONLY = ("timm_pool", "timm_proj", "timm_proj_bias", "timm_drop_path")

_OPENAI_VIT_RULES: dict[str, Rule] = {
    **{key: _ANY for key in _VISION_FREE + _TIMM_ONLY},
    "timm_model_name": _ANY,
    "layers": _SIZE, "width": _SIZE, "head_width": _SIZE, "patch_size": _SQUARE, "image_size": _SQUARE,
    "mlp_ratio": _MLP4, "ls_init_value": (lambda v: v is None, "our towers have no layer scale"),
    "attentional_pool": (lambda v: not v, "our ViTs pool the class token, not with attention"),
    "no_ln_pre": (lambda v: not v, "our OpenAI-layout ViT has a LayerNorm before the blocks"),
    "pos_embed_type": (lambda v: v == "learnable", "our ViTs learn their position embedding"),
    # LayerNorm works per token, so normalising before or after taking the class token is the same.
    "final_ln_after_pool": _ANY,
    "pool_type": (lambda v: v == "tok", "our ViTs pool the class token"),
    "act_kwargs": _NO_KWARGS, "norm_kwargs": _EPS_1E5, "block_type": _DEFAULT_BLOCK,
    **{key: _OFF for key in _CUSTOM_BLOCK},
}
_RESNET_RULES: dict[str, Rule] = {
    **{key: _ANY for key in _VISION_FREE + _TIMM_ONLY + _VIT_ONLY},  # open_clip's ModifiedResNet ignores these
    "timm_model_name": _ANY,
    "layers": (lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(is_positive_int(n) for n in v),
               "a ModifiedResNet has 4 stages"),
    "width": _SIZE, "head_width": _SIZE, "image_size": _SQUARE,
}
_TIMM_RULES: dict[str, Rule] = {
    **{key: _ANY for key in _VISION_FREE + _VIT_ONLY},  # open_clip's TimmModel ignores these
    "layers": _ANY, "width": _ANY, "head_width": _ANY,
    "timm_model_name": (lambda v: isinstance(v, str) and bool(v), "a timm model name is needed"),
    "image_size": _SQUARE,
    "timm_pool": (lambda v: v in ("token", ""), "our timm ViT pools the class token"),
    "timm_proj": (lambda v: v == "linear", "our image projection is one bias-free linear map"),
    "timm_proj_bias": (lambda v: not v, "our image projection has no bias"),
    "timm_drop_path": (lambda v: v is None or (isinstance(v, (int, float)) and 0 <= v < 1), "a rate is needed"),
}
_TEXT_RULES: dict[str, Rule] = {
    "context_length": _SIZE, "vocab_size": _SIZE, "width": _SIZE, "heads": _SIZE, "layers": _SIZE,
    "hf_model_name": (lambda v: not v, "custom Hugging Face text towers are not our CLIP text tower"),
    "hf_tokenizer_name": (lambda v: not v, "our tokenizer is CLIP's BPE"),
    "tokenizer_mode": (lambda v: not v, "our tokenizer is CLIP's BPE"),
    "tokenizer_kwargs": (lambda v: not v, "our tokenizer is CLIP's BPE with its default cleaning"),
    "hf_model_pretrained": _ANY, "hf_proj_type": _ANY, "hf_pooler_type": _ANY,  # unused without hf_model_name
    "mlp_ratio": _MLP4, "ls_init_value": (lambda v: v is None, "our text tower has no layer scale"),
    "embed_cls": (lambda v: not v, "our text tower has no class token"),
    "pad_id": _ANY, "eos_id": _ANY,  # used only with embed_cls / pool_type 'eos'
    "no_causal_mask": (lambda v: not v, "our text tower is causal"),
    "final_ln_after_pool": _ANY,  # LayerNorm works per token
    "pool_type": (lambda v: v == "argmax", "our text tower pools at the largest token id (EOT)"),
    "proj_bias": (lambda v: not v, "our text projection has no bias"),
    "proj_type": (lambda v: v == "linear", "our text projection is one bias-free linear map"),
    "output_tokens": _ANY,
    "act_kwargs": _NO_KWARGS, "norm_kwargs": _EPS_1E5, "block_type": _DEFAULT_BLOCK,
    **{key: _OFF for key in _CUSTOM_BLOCK},
}
_MODEL_RULES: dict[str, Rule] = {
    "embed_dim": _SIZE, "vision_cfg": _ANY, "text_cfg": _ANY,
    "quick_gelu": (lambda v: bool(v), "our text tower and OpenAI-layout ViT use QuickGELU"),
    "init_logit_scale": _ANY, "output_dict": _ANY, "nonscalar_logit_scale": _ANY,
    "init_logit_bias": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v)), "a number is needed"),
    "custom_text": _ANY,  # CustomTextCLIP keeps the same text tower under "text."
}
_REASONS_FOR_UNKNOWN = {"multimodal_cfg": "a CoCa captioning decoder has no place in our models"}


# ----------------------------------------------------------------------------------------------------------------
# export


def export_open_clip(model: ImageTextModel, out_dir: Path, logit_bias: torch.Tensor | None = None) -> Exported:
    """Write `model` as an open_clip model directory (`open_clip_config.json` + `open_clip_model.safetensors`).

    `open_clip.create_model("local-dir:" + str(out_dir))` then builds the same model and loads the weights
    strictly; with `logit_bias` (SigLIP's, a scalar) that model has it as its `logit_bias` parameter. Raises
    ExportError (writing nothing) for a model open_clip cannot express exactly.
    """
    out_dir = Path(out_dir)
    spec = model.spec
    vision, text, image_size = spec.vision, spec.text, spec.preprocess.image_size
    if model.text is None:
        raise ExportError("the model has no text tower (an SSL-only objective): an open_clip model needs one")
    notes: list[str] = []
    if isinstance(vision, ResNetSpec):
        width, heads = vision.width, vision.heads
        if (width * 32) % heads:
            raise ExportError(f"open_clip's ModifiedResNet cannot have {heads} attention-pool heads at width "
                              f"{width * 32} (it builds width*32 // head_width heads)")
        vision_cfg: dict[str, Any] = dict(image_size=image_size, layers=list(vision.layers),
                                          width=width, head_width=width * 32 // heads)
        state = to_openai(model)
    elif isinstance(vision, ViTSpec) and vision.openai_layout:
        width, heads = vision.width, vision.heads
        vision_cfg = dict(image_size=image_size, layers=vision.layers, width=width,
                          head_width=width // heads, patch_size=vision.patch_size, mlp_ratio=4.0)
        state = to_openai(model)
        if vision.drop_path_rate:
            notes.append(f"drop_path_rate={vision.drop_path_rate} (training-time stochastic depth) has no place "
                         "in open_clip's VisionTransformer and was left out")
    elif isinstance(vision, ViTSpec):
        patch_size, drop_path_rate = vision.patch_size, vision.drop_path_rate
        name, closest = timm_name_for(model.visual, image_size, patch_size, drop_path_rate)
        if name is None:
            raise ExportError(
                f"open_clip builds timm towers by registered name only, and no timm name builds this SLIP-layout "
                f"ViT (width {vision.width}, {vision.layers} layers, {vision.heads} heads, "
                f"patch {patch_size}, {image_size} px){closest}")
        vision_cfg = dict(timm_model_name=name, timm_model_pretrained=False, timm_pool="token",
                          timm_proj="linear", timm_proj_bias=False, image_size=image_size)
        if drop_path_rate:
            vision_cfg["timm_drop_path"] = drop_path_rate
        state = {}
        for key, value in model.state_dict().items():
            if key.startswith("image_mlp."):
                continue
            if key == "image_projection":
                state["visual.head.proj.weight"] = value.t()
            elif key.startswith("visual."):
                state["visual.trunk." + key[len("visual."):]] = value
            else:
                state[unprefix_text_keys(key)] = value
    else:
        raise ExportError(f"a {type(vision).__name__} image tower has no open_clip counterpart")
    if model.image_mlp is not None:
        notes.append(SSL_HEAD_NOTE)

    model_cfg: dict[str, Any] = {
        "embed_dim": spec.head.embed_dim,
        "quick_gelu": True,
        "vision_cfg": vision_cfg,
        "text_cfg": dict(context_length=text.context_length, vocab_size=text.vocab_size,
                         width=text.width, heads=text.heads, layers=text.layers),
    }
    if logit_bias is not None:
        if logit_bias.numel() != 1:
            raise ExportError(f"the logit bias has shape {tuple(logit_bias.shape)}; open_clip's is one number")
        model_cfg["init_logit_bias"] = float(logit_bias)
        state = {**state, LOGIT_BIAS_KEY: logit_bias.reshape(())}
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(spec.preprocess.mean), "std": list(spec.preprocess.std)}}
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return Exported([config_path, weights_path], notes)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _check_section(section: str, given: Mapping[str, Any], defaults: Mapping[str, Any], rules: Mapping[str, Rule],
                   config_path: Path) -> dict[str, Any]:
    """`given` over `defaults`, with every key checked against `rules` (given keys first, in file order)."""
    if not isinstance(given, Mapping):
        raise CheckpointError(f"{config_path}: {section} is not a JSON object")
    merged = {**defaults, **given}
    for key in [*given, *(k for k in defaults if k not in given)]:
        value = merged[key]
        where = f"{section}.{key}={json.dumps(value, default=str)}" + ("" if key in given else " (the default)")
        if key not in rules:
            reason = _REASONS_FOR_UNKNOWN.get(key, "not a key our models can express")
            raise CheckpointError(f"{config_path}: {where} is not supported ({reason})")
        accepts, reason = rules[key]
        if not accepts(value):
            raise CheckpointError(f"{config_path}: {where} is not supported ({reason})")
    return merged


def _spec_from_config(config: Mapping[str, Any], config_path: Path) -> tuple[ModelSpec, str, dict[str, Any]]:
    """Our model spec for an open_clip config, the weights' layout ("openai" or "timm"), and the merged model cfg."""
    try:
        return _read_config(config, config_path)
    except ValueError as error:  # a spec's own check: CheckpointError is a ValueError too, and passes as it is
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{config_path}: not a model our builders can make ({first_line(error)})") from None


def _read_config(config: Mapping[str, Any], config_path: Path) -> tuple[ModelSpec, str, dict[str, Any]]:
    model_cfg = config.get("model_cfg", config)
    model_cfg = _check_section("model_cfg", model_cfg, _MODEL_CFG_DEFAULTS, _MODEL_RULES, config_path)
    for section in ("embed_dim", "vision_cfg", "text_cfg"):
        if section not in model_cfg:
            raise CheckpointError(f"{config_path}: model_cfg has no {section}")
    given_vision = model_cfg["vision_cfg"] if isinstance(model_cfg["vision_cfg"], Mapping) else {}
    if given_vision.get("timm_model_name"):
        kind, rules = "timm", _TIMM_RULES
    elif isinstance(given_vision.get("layers"), (list, tuple)):
        kind, rules = "resnet", _RESNET_RULES
    else:
        kind, rules = "vit", _OPENAI_VIT_RULES
    vision = _check_section("model_cfg.vision_cfg", model_cfg["vision_cfg"], VISION_CFG_DEFAULTS, rules, config_path)
    text = _check_section("model_cfg.text_cfg", model_cfg["text_cfg"], TEXT_CFG_DEFAULTS, _TEXT_RULES, config_path)

    preprocess = config.get("preprocess_cfg") or {}
    mean, std = preprocess.get("mean", OPENAI_CLIP_MEAN), preprocess.get("std", OPENAI_CLIP_STD)
    common: dict[str, Any] = dict(
        embed_dim=model_cfg["embed_dim"], text_width=text["width"], text_layers=text["layers"],
        text_heads=text["heads"], context_length=text["context_length"], vocab_size=text["vocab_size"],
        inputs=IMAGE_TEXT, image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std),
    )
    image_size = square_side(vision["image_size"])
    if kind == "resnet":
        width = vision["width"]
        spec = resnet_spec(**common, image_size=image_size, vision_layers=tuple(vision["layers"]),
                           vision_width=width, vision_heads=width * 32 // vision["head_width"])
        return spec, "openai", model_cfg
    if kind == "vit":
        spec = vit_spec(**common, openai_layout=True, image_size=image_size,
                        patch_size=square_side(vision["patch_size"]), vision_width=vision["width"],
                        vision_layers=vision["layers"], vision_heads=vision["width"] // vision["head_width"])
        return spec, "openai", model_cfg

    # timm: the trunk is whatever the registered name builds; it must be exactly our SLIP-layout ViT.
    name = vision["timm_model_name"]
    drop_path_rate = float(vision["timm_drop_path"] or 0.0)
    where = f"{config_path}: model_cfg.vision_cfg.timm_model_name={json.dumps(name)}"
    try:
        trunk = timm_trunk(name, vision["timm_pool"], drop_path_rate)
        dims = dict(image_size=trunk.patch_embed.img_size[0], patch_size=trunk.patch_embed.patch_size[0],
                    width=trunk.embed_dim, depth=len(trunk.blocks), heads=trunk.blocks[0].attn.num_heads)
        with torch.device("meta"):
            ours = vit_tower(**dims, openai_layout=False, drop_path_rate=drop_path_rate)
    except Exception as error:  # noqa: BLE001 - unknown names and towers of other kinds alike
        raise CheckpointError(f"{where} is not supported (not a timm ViT our towers can build: "
                              f"{first_line(error)})") from None
    theirs = structure(trunk)
    if theirs != (mine := structure(ours)):
        raise CheckpointError(f"{where} is not supported (not our SLIP-layout timm ViT: "
                              f"{first_difference(mine, theirs)})")
    if image_size != dims["image_size"]:
        raise CheckpointError(f"{config_path}: model_cfg.vision_cfg.image_size={image_size} is not supported "
                              f"({name} takes {dims['image_size']} px and open_clip does not resize it)")
    spec = vit_spec(**common, openai_layout=False, image_size=dims["image_size"], patch_size=dims["patch_size"],
                    vision_width=dims["width"], vision_layers=dims["depth"], vision_heads=dims["heads"],
                    drop_path_rate=drop_path_rate)
    return spec, "timm", model_cfg


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable or unsafe content alike
        raise CheckpointError(f"{path}: unreadable weights ({first_line(error)})") from None
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if content and all(key.startswith("module.") for key in content):
        content = {key[len("module."):]: value for key, value in content.items()}
    return dict(content)


def _to_slip_state(raw: Mapping[str, torch.Tensor], spec: ModelSpec, kind: str,
                   weights_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our state dict, and for each of our keys the open_clip key it came from."""
    raw = dict(raw)
    if "logit_scale" in raw and raw["logit_scale"].numel() == 1:
        raw["logit_scale"] = raw["logit_scale"].reshape(())
    if kind == "timm":
        state, sources = {}, {}
        for key, value in raw.items():
            if key == "visual.head.proj.weight":
                new_key, value = "image_projection", value.t()
            elif key.startswith("visual.trunk."):
                new_key = "visual." + key[len("visual.trunk."):]
            else:
                new_key = prefix_text_keys(key)
            state[new_key] = value.float() if value.is_floating_point() else value
            sources[new_key] = key
        return state, sources
    try:
        converted = from_openai(raw, OPEN_CLIP_INFO)
    except (KeyError, IndexError) as error:
        raise CheckpointError(f"{weights_path}: weights do not fit {CONFIG_NAME}: no {first_line(error)}") from None
    if type(converted.spec.vision) is not type(spec.vision):
        raise CheckpointError(f"{weights_path}: weights do not fit {CONFIG_NAME}: they hold a "
                              f"{converted.spec.vision.tower_name} image tower where the config has a "
                              f"{spec.vision.tower_name}")
    vit = isinstance(spec.vision, ViTSpec)
    sources = {prefix_text_keys(openai_vit_key_to_ours(key) if vit and key.startswith("visual.") else key): key
               for key in raw}
    # from_openai makes every tensor float; BatchNorm's step counters stay integers.
    state = {key: (raw[sources[key]] if not raw[sources[key]].is_floating_point() else value)
             for key, value in converted.state.items()}
    return state, sources


def _check_fit(spec: ModelSpec, state: Mapping[str, torch.Tensor], sources: Mapping[str, str],
               config_path: Path, weights_path: Path) -> None:
    """CheckpointError naming the first key where the weights and the model the config describes differ."""
    try:
        with torch.device("meta"):
            expected = build_model(spec).state_dict()
    except (ValueError, ZeroDivisionError) as error:
        raise CheckpointError(f"{config_path}: not a model our builders can make ({first_line(error)})") from None
    prefix = f"{weights_path}: weights do not fit {CONFIG_NAME}:"
    for key, tensor in expected.items():
        if key.startswith("image_mlp."):
            continue
        if key not in state:
            raise CheckpointError(f"{prefix} no tensor for {key} (our name)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{prefix} {sources.get(key, key)} has shape {tuple(state[key].shape)} where the "
                                  f"config needs {tuple(tensor.shape)}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{prefix} {sources.get(key, key)} has no place in the configured model")


def read_open_clip(path: Path) -> Converted | None:
    """An open_clip model directory (`open_clip_config.json` + `open_clip_model.safetensors` or
    `open_clip_pytorch_model.bin`) in our terms; None for anything else.

    Raises CheckpointError (one line naming the file and the first offending key) for a config our models cannot
    express or weights that do not fit it.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    config_path = path / CONFIG_NAME
    weights_path = next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), None)
    if not config_path.is_file() or weights_path is None:
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: unreadable JSON ({first_line(error)})") from None
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{config_path}: not a JSON object")
    spec, kind, model_cfg = _spec_from_config(config, config_path)
    raw = _load_weights(weights_path)
    objective_state: dict[str, torch.Tensor] = {}
    if model_cfg["init_logit_bias"] is not None:
        bias = raw.pop(LOGIT_BIAS_KEY, None)
        if bias is None or bias.numel() != 1 or not bias.is_floating_point():
            setting = json.dumps(model_cfg["init_logit_bias"])
            raise CheckpointError(f"{config_path}: model_cfg.init_logit_bias={setting} says the model has a logit "
                                  f"bias, but {weights_path} holds no scalar {LOGIT_BIAS_KEY}")
        objective_state[LOGIT_BIAS_KEY] = bias.reshape(())
    if model_cfg.get("custom_text"):  # CustomTextCLIP keeps CLIP's text tower under "text."
        raw = {("text_projection" if key == "text.text_projection" else unprefix_text_keys(key)): value
               for key, value in raw.items()}
    state, sources = _to_slip_state(raw, spec, kind, weights_path)
    _check_fit(spec, state, sources, config_path, weights_path)
    if not objective_state:
        return Converted(spec, state, OPEN_CLIP_INFO)
    # A learned sigmoid bias: the model was trained as SigLIP is.
    info = CheckpointInfo("open_clip", "SigLIPLoss", logit_bias=float(objective_state[LOGIT_BIAS_KEY]))
    return Converted(spec, state, info, objective_state)
