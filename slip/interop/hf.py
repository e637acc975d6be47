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
from slip.error_text import named_one_line, one_line
from slip.interop.common import Converted, ExportError, Exported, is_positive_int, square_side
from slip.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTextModel, build_from_arch

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
# The key correspondence: one link per tensor of ours, naming the transformers tensor(s) it becomes.
# ----------------------------------------------------------------------------------------------------------

def _qkv(prefix: str, kind: str) -> list[str]:
    return [f"{prefix}.self_attn.{part}_proj.{kind}" for part in ("q", "k", "v")]


# Our parameter names in one Transformer block of each tower, by role.
_TEXT_BLOCK = {"norm1": "ln_1", "qkv_weight": "attn.in_proj_weight", "qkv_bias": "attn.in_proj_bias",
               "out": "attn.out_proj", "norm2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_VISION_BLOCK = {"norm1": "norm1", "qkv_weight": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias",
                 "out": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
# transformers' names of the same roles (the fused q/k/v projection is split, see _qkv).
_THEIR_BLOCK = {"norm1": "layer_norm1", "out": "self_attn.out_proj", "norm2": "layer_norm2", "fc1": "mlp.fc1",
                "fc2": "mlp.fc2"}


def _block_links(ours: str, theirs: str, names: Mapping[str, str]) -> list[tuple[str, list[str], str]]:
    """The links of one Transformer block whose parameters are named `names` on our side."""
    links = [(f"{ours}.{names['qkv_weight']}", _qkv(theirs, "weight"), "split3"),
             (f"{ours}.{names['qkv_bias']}", _qkv(theirs, "bias"), "split3")]
    for role, their_name in _THEIR_BLOCK.items():
        links += [(f"{ours}.{names[role]}.{kind}", [f"{theirs}.{their_name}.{kind}"], "same")
                  for kind in ("weight", "bias")]
    return links


def _links(arch: Mapping[str, Any]) -> list[tuple[str, list[str], str]]:
    """(our key, transformers keys, how) for every tensor; how: same, split3, vector, matrix or transpose."""
    links: list[tuple[str, list[str], str]] = [
        ("logit_scale", ["logit_scale"], "same"),
        ("text.token_embedding.weight", ["text_model.embeddings.token_embedding.weight"], "same"),
        ("text.positional_embedding", ["text_model.embeddings.position_embedding.weight"], "same"),
    ]
    for i in range(arch["text_layers"]):
        links += _block_links(f"text.transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _TEXT_BLOCK)
    links += [
        ("text.ln_final.weight", ["text_model.final_layer_norm.weight"], "same"),
        ("text.ln_final.bias", ["text_model.final_layer_norm.bias"], "same"),
        ("visual.cls_token", ["vision_model.embeddings.class_embedding"], "vector"),
        ("visual.patch_embed.proj.weight", ["vision_model.embeddings.patch_embedding.weight"], "same"),
        ("visual.pos_embed", ["vision_model.embeddings.position_embedding.weight"], "matrix"),
        ("visual.norm_pre.weight", ["vision_model.pre_layrnorm.weight"], "same"),
        ("visual.norm_pre.bias", ["vision_model.pre_layrnorm.bias"], "same"),
    ]
    for i in range(arch["vision_layers"]):
        links += _block_links(f"visual.blocks.{i}", f"vision_model.encoder.layers.{i}", _VISION_BLOCK)
    links += [
        ("visual.norm.weight", ["vision_model.post_layernorm.weight"], "same"),
        ("visual.norm.bias", ["vision_model.post_layernorm.bias"], "same"),
        ("image_projection", ["visual_projection.weight"], "transpose"),
        ("text_projection", ["text_projection.weight"], "transpose"),
    ]
    return links


def _to_theirs(value: torch.Tensor, how: str) -> list[torch.Tensor]:
    if how == "split3":
        return list(value.chunk(3, dim=0))
    if how in ("vector", "matrix"):
        return [value.reshape(value.shape[-1]) if how == "vector" else value.reshape(-1, value.shape[-1])]
    if how == "transpose":
        return [value.t()]
    return [value]


def _to_ours(values: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "split3":
        return torch.cat(values, dim=0)
    if how in ("vector", "matrix"):
        return values[0].reshape(1, -1, values[0].shape[-1])
    if how == "transpose":
        return values[0].t().contiguous()
    return values[0]


def _their_shapes(our_shape: torch.Size, how: str) -> list[tuple[int, ...]]:
    """The transformers shapes a tensor of ours with `our_shape` becomes."""
    return [tuple(t.shape) for t in _to_theirs(torch.empty(our_shape, device="meta"), how)]


def _our_shapes(arch: Mapping[str, Any]) -> dict[str, torch.Size]:
    """The exact state-dict shapes of the model `build_from_arch(arch)` builds (on the meta device: free)."""
    with torch.device("meta"):
        model = build_from_arch(arch)
    return {key: value.shape for key, value in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# slip -> transformers
# ----------------------------------------------------------------------------------------------------------

def _refuse(reason: str) -> ExportError:
    return ExportError(f"hf: {reason}; no file written")


def _check_expressible(model: ImageTextModel) -> None:
    """Raise ExportError naming the first piece of `model` that transformers' CLIPModel cannot express."""
    arch = model.arch
    if model.text is None:
        raise _refuse("the model has no text tower (an SSL-only objective), which a transformers CLIPModel "
                      "needs")
    family = arch.get("family")
    if family == "resnet":
        raise _refuse("a ModifiedResNet image tower has no counterpart in transformers' CLIPModel, whose "
                      "CLIPVisionModel is a ViT")
    if family != "vit":
        raise _refuse(f"arch family {family!r} is not a ViT, the only image tower transformers' CLIPModel "
                      "has")
    if not arch.get("openai_layout"):
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
        if block.attn.num_heads != arch["vision_heads"]:
            raise _refuse(f"visual.blocks.{index}.attn has {block.attn.num_heads} heads but the arch record "
                          f"says vision_heads={arch['vision_heads']}")
    for index, block in enumerate(model.text.transformer.resblocks):
        if block.attn.heads != arch["text_heads"]:
            raise _refuse(f"text.transformer.resblocks.{index}.attn has {block.attn.heads} heads but the "
                          f"arch record says text_heads={arch['text_heads']}")
    if getattr(model.visual, "global_pool", "token") != "token":
        raise _refuse(f"the ViT pools with {model.visual.global_pool!r}; transformers pools the class token")


def _checked_state(model: ImageTextModel) -> dict[str, torch.Tensor]:
    """`model`'s tensors, less the SSL head, after checking they are exactly what its arch record builds."""
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("image_mlp.")}
    expected = _our_shapes(model.arch)
    linked = {link[0] for link in _links(model.arch)}
    for key in state:
        if key not in linked:
            raise _refuse(f"the model has {key}, which transformers' CLIPModel has no place for")
    for key in linked:
        if key not in state:
            raise _refuse(f"the model lacks {key}, which transformers' CLIPModel needs")
        if state[key].shape != expected[key]:
            raise _refuse(f"{key} has shape {list(state[key].shape)} but the arch record builds "
                          f"{list(expected[key])}")
    return state


def _to_hf_state(state: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    converted = {}
    for ours, theirs, how in _links(arch):
        for key, value in zip(theirs, _to_theirs(state[ours].detach().cpu(), how)):
            converted[key] = value.clone(memory_format=torch.contiguous_format)  # safetensors: no sharing
    return converted


def _hf_config(arch: Mapping[str, Any], logit_scale: float, dtype: torch.dtype):
    from transformers import CLIPConfig

    vocab_size = arch["vocab_size"]
    text_config = dict(
        vocab_size=vocab_size, hidden_size=arch["text_width"],
        intermediate_size=MLP_RATIO * arch["text_width"], num_hidden_layers=arch["text_layers"],
        num_attention_heads=arch["text_heads"], max_position_embeddings=arch["context_length"],
        hidden_act="quick_gelu", layer_norm_eps=LAYER_NORM_EPS,
        projection_dim=arch["embed_dim"],
        # Our tokenizer's EOT (pooled) and SOT are the last two ids of the vocabulary.
        eos_token_id=vocab_size - 1, bos_token_id=max(vocab_size - 2, 0),
    )
    vision_config = dict(
        hidden_size=arch["vision_width"], intermediate_size=MLP_RATIO * arch["vision_width"],
        num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"], num_channels=3,
        image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_act="quick_gelu",
        layer_norm_eps=LAYER_NORM_EPS, projection_dim=arch["embed_dim"],
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=arch["embed_dim"],
                      logit_scale_init_value=logit_scale, architectures=["CLIPModel"],
                      dtype=str(dtype).removeprefix("torch."))


def _preprocessor_config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A CLIPImageProcessor config doing our eval view: bilinear shorter-side resize, centre crop,
    normalise with the model's mean/std."""
    size = arch["image_size"]
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 2,  # PIL bilinear, as slip.data.transforms.eval_view
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in arch["image_mean"]],
        "image_std": [float(s) for s in arch["image_std"]],
    }


def hf_tokenizer_files(out_dir: Path, context_length: int) -> list[Path]:
    """Write slip's tokenizer as transformers' CLIPTokenizer files into `out_dir`.

    vocab.json and merges.txt are built as our tokenizer builds its vocabulary (byte symbols, byte symbols +
    "</w>", the merges joined, then SOT and EOT), plus tokenizer.json, tokenizer_config.json and
    special_tokens_map.json. `CLIPTokenizer.from_pretrained(out_dir)` then gives `slip.tokenizer.tokenize`'s
    ids up to the end token (transformers pads with EOT where we pad with 0).
    """
    from transformers import CLIPTokenizer

    from slip.tokenizer import EOT_TOKEN, SOT_TOKEN, default_merges_path, default_tokenizer, read_merges

    ours = default_tokenizer()
    vocab = {ours.id_to_token(index): index for index in range(ours.vocab_size)}
    merges = read_merges(default_merges_path())
    specials = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
                "pad_token": EOT_TOKEN}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
            "add_prefix_space": False, "errors": "replace", **specials,
        }, indent=2),
    }
    written = []
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    # tokenizer.json: the same tokenizer in the `tokenizers` library's own format, as hub CLIP repos carry it.
    hf_tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **specials)
    hf_tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    written.append(out_dir / "tokenizer.json")
    return written


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

    arch = model.arch
    notes = [SSL_HEAD_NOTE] if model.image_mlp is not None else []
    hf_state = _to_hf_state(state, arch)
    config = _hf_config(arch, float(model.logit_scale.detach()), model.logit_scale.dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    weights = out_dir / WEIGHTS_FILE
    safetensors.torch.save_file(hf_state, str(weights), metadata={"format": "pt"})
    preprocessor = out_dir / PREPROCESSOR_FILE
    preprocessor.write_text(json.dumps(_preprocessor_config(arch), indent=2) + "\n", encoding="utf-8")
    files = [out_dir / CONFIG_FILE, weights, preprocessor]
    if arch["vocab_size"] == VOCAB_SIZE:
        files += hf_tokenizer_files(out_dir, arch["context_length"])
    else:
        notes.append(f"no tokenizer files were written: the model's vocab_size={arch['vocab_size']} is not "
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


def _arch_from_config(config: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """Our arch record for a CLIPConfig dict; CheckpointError where our towers cannot compute what it says."""
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
        family="vit", openai_layout=True, image_size=image_size, patch_size=patch_size,
        vision_width=vision["hidden_size"], vision_layers=integer("vision_config", "num_hidden_layers"),
        vision_heads=vision["num_attention_heads"], embed_dim=embed_dim,
        text_width=text["hidden_size"], text_layers=integer("text_config", "num_hidden_layers"),
        text_heads=text["num_attention_heads"],
        context_length=integer("text_config", "max_position_embeddings"), vocab_size=vocab_size,
        inputs=("image", "text"),
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


def _from_hf_state(hf_state: Mapping[str, torch.Tensor], arch: Mapping[str, Any], source: Path,
                   config_path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from the transformers tensors, checking every key and shape against `arch` first."""
    try:
        shapes = _our_shapes(arch)
    except ValueError as error:  # a builder's check that the config checks above did not anticipate
        raise CheckpointError(f"{config_path}: {one_line(error)}") from None
    links = _links(arch)
    expected: dict[str, tuple[int, ...]] = {}
    for ours, theirs, how in links:
        expected.update(zip(theirs, _their_shapes(shapes[ours], how)))
    for key, shape in expected.items():
        if key not in hf_state:
            raise CheckpointError(f"{source}: missing weight {key}, which {config_path.name} implies")
        if tuple(hf_state[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {list(hf_state[key].shape)}, "
                                  f"{config_path.name} implies {list(shape)}")
    for key in hf_state:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected weight {key}, which a CLIPModel of "
                                  f"{config_path.name} does not have")
    return {ours: _to_ours([hf_state[key] for key in theirs], how) for ours, theirs, how in links}


def _check_vocabulary(directory: Path) -> None:
    """Raise CheckpointError where the directory's tokenizer (vocab.json) is not slip's CLIP vocabulary, whose
    ids the text tower would then be fed; a directory without one is taken as CLIP's."""
    vocab_path = directory / "vocab.json"
    if not vocab_path.is_file():
        return
    from slip.tokenizer import default_tokenizer

    try:
        theirs = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{vocab_path}: unreadable vocabulary ({type(error).__name__}: {error})") from None
    ours = default_tokenizer()
    if not isinstance(theirs, Mapping) or len(theirs) != ours.vocab_size:
        size = len(theirs) if isinstance(theirs, Mapping) else type(theirs).__name__
        raise CheckpointError(f"{vocab_path}: not slip's CLIP vocabulary: {size} tokens, slip's tokenizer has "
                              f"{ours.vocab_size}")
    by_id = {index: token for token, index in theirs.items()}
    for index in range(ours.vocab_size):
        if by_id.get(index) != ours.id_to_token(index):
            raise CheckpointError(f"{vocab_path}: not slip's CLIP vocabulary: id {index} is {by_id.get(index)!r}, "
                                  f"slip's tokenizer has {ours.id_to_token(index)!r}")


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
    _check_vocabulary(directory)
    arch = _arch_from_config(config, config_path)
    arch.update(_normalization(directory))
    hf_state, source = _load_weights(directory)
    state = _from_hf_state(hf_state, arch, source, config_path)
    return Converted(arch, state, CheckpointInfo(HF_FORMAT, "CLIPLoss"))
