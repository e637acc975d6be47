"""Checkpoint files: atomic saving, and `load_pretrained` for our own, original-SLIP and OpenAI-CLIP formats."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO, Mapping

import torch
from omegaconf import OmegaConf

from slip.models import (ALL_INPUTS, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                         ImageTextModel, build_from_arch)

FORMAT_NAME = "slip"
FORMAT_VERSION = 1

# The original SLIP code names its models OBJECTIVE_ARCH (e.g. SLIP_VITB16); these tables read that field.
SLIP_OBJECTIVE_INPUTS: Mapping[str, tuple[str, ...]] = {
    "SLIP": ALL_INPUTS,
    "CLIP": ("image", "text"),
    "SIMCLR": ("aug1", "aug2"),
}
SLIP_OBJECTIVE_NAMES: Mapping[str, str] = {"SLIP": "SLIPLoss", "CLIP": "CLIPLoss", "SIMCLR": "SimCLRLoss"}
SLIP_VISION_HEADS: Mapping[str, int] = {"VITS16": 12, "VITB16": 12, "VITL16": 16}
SLIP_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Types besides tensors and containers that the supported formats pickle: SLIP keeps argparse args.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a model; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about how its weights were trained (None where its format does not record it)."""

    format: str  # "slip", "slip-original" or "openai-clip"
    objective: str | None = None  # the objective's class name, e.g. "SLIPLoss"
    step: int | None = None
    config: str | None = None  # the resolved training config (YAML), for our own checkpoints


def _objective_from_config(config_text: str | None) -> str | None:
    """The objective class name recorded in a training config's loss._target_."""
    target = OmegaConf.select(OmegaConf.create(config_text or "{}"), "loss._target_", default=None)
    return str(target).rsplit(".", 1)[-1] if target else None


def model_checkpoint(model: ImageTextModel) -> dict[str, Any]:
    """The dict that stores a model in this toolkit's format: architecture record plus weights."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": dict(model.arch),
        "model": model.state_dict(),
    }


def atomic_save(obj: Any, path: str | os.PathLike, remove_stale: bool = False) -> Path:
    """torch.save `obj` to `path` atomically (`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle), remove_stale)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], remove_stale: bool = False) -> Path:
    """`write(handle)` to a temporary file in the same folder, fsync, then rename over `path`.

    A failed write (e.g. a full disk) leaves any previous file at `path` as it was; the OSError says so.
    `remove_stale`: after success, delete the temporary files of earlier saves to `path` that were cut short
    (e.g. by kill -9); only for a caller that is the one process saving to `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        kept = "the previous file there is intact" if path.exists() else "there was no previous file"
        raise OSError(error.errno, f"{path}: could not save ({error.strerror or error}); {kept}") from error
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if remove_stale:
        for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
            stale.unlink(missing_ok=True)
    return path


def save_model(model: ImageTextModel, path: str | os.PathLike) -> Path:
    """Write `model` atomically in this toolkit's checkpoint format."""
    return atomic_save(model_checkpoint(model), path)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.search(r"(^|/)(code/|constants\.pkl$)", name) for name in archive.namelist())


def _read_file(path: Path) -> Any:
    """Unpickle with weights_only=True; only tensors, containers and SAFE_GLOBALS are reconstructed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: refused to unpickle (only tensors and plain data are allowed): "
                              f"{reason}") from None
    # Garbage that happens to parse as a legacy pickle fails anywhere in the unpickler: IndexError, KeyError,
    # UnicodeDecodeError, ... (about 6% of random 1 kB files); every such failure means the same thing.
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{' '.join(str(error).split())})") from None


def _read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Only the tensors of a TorchScript archive are used; its code is never called."""
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: unreadable TorchScript archive ({first_line})") from None
    return {name: tensor.detach().clone() for name, tensor in scripted.state_dict().items()}


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _text_arch(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """Text-tower hyperparameters read off the tensor shapes (CLIP's heads are width / 64)."""
    width = state[f"{prefix}ln_final.weight"].shape[0]
    return dict(
        text_width=width,
        text_heads=max(width // 64, 1),
        text_layers=_count_blocks(state, f"{prefix}transformer.resblocks."),
        context_length=state[f"{prefix}positional_embedding"].shape[0],
        vocab_size=state[f"{prefix}token_embedding.weight"].shape[0],
    )


def _openai_vit_key(key: str) -> str:
    renames = [
        (r"^visual\.conv1\.", "visual.patch_embed.proj."),
        (r"^visual\.class_embedding$", "visual.cls_token"),
        (r"^visual\.positional_embedding$", "visual.pos_embed"),
        (r"^visual\.ln_pre\.", "visual.norm_pre."),
        (r"^visual\.ln_post\.", "visual.norm."),
        (r"^visual\.proj$", "image_projection"),
        (r"^visual\.transformer\.resblocks\.", "visual.blocks."),
        (r"\.ln_1\.", ".norm1."),
        (r"\.ln_2\.", ".norm2."),
        (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
        (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
        (r"\.attn\.out_proj\.", ".attn.proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc1."),
        (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    ]
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _prefix_text_keys(key: str) -> str:
    return f"text.{key}" if key.startswith(SLIP_TEXT_PREFIXES) else key


def _from_openai(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """OpenAI CLIP state dict (ViT or ModifiedResNet) -> (arch record, our state dict)."""
    state = {k: v.float() for k, v in state.items() if k not in OPENAI_METADATA_KEYS}
    arch: dict[str, Any] = dict(_text_arch(state), embed_dim=state["text_projection"].shape[1],
                                inputs=("image", "text"), image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    if "visual.proj" in state:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        arch.update(family="vit", openai_layout=True, patch_size=patch, image_size=patch * grid,
                    vision_width=width, vision_heads=width // 64,
                    vision_layers=_count_blocks(state, "visual.transformer.resblocks."))
        converted = {}
        for key, value in state.items():
            new_key = _prefix_text_keys(_openai_vit_key(key)) if key.startswith("visual.") else _prefix_text_keys(key)
            if new_key in ("visual.cls_token", "visual.pos_embed"):
                value = value.reshape(1, -1, width)
            converted[new_key] = value
    else:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        arch.update(family="resnet", image_size=grid * 32, vision_width=width, vision_heads=width * 32 // 64,
                    vision_layers=tuple(_count_blocks(state, f"visual.layer{i}.") for i in range(1, 5)))
        converted = {_prefix_text_keys(key): value for key, value in state.items()}
    return arch, converted


def _from_original_slip(checkpoint: Mapping[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Original SLIP checkpoint ({'state_dict': module.*, 'args': Namespace(model=...)}) -> (arch, state)."""
    model_name = str(getattr(checkpoint["args"], "model", ""))
    objective, _, vision = model_name.partition("_")
    if objective not in SLIP_OBJECTIVE_INPUTS or vision not in SLIP_VISION_HEADS:
        raise CheckpointError(
            f"{path}: args.model={model_name!r} is not a SLIP model name "
            f"({'/'.join(SLIP_OBJECTIVE_INPUTS)} + _ + {'/'.join(SLIP_VISION_HEADS)})"
        )
    state = {re.sub(r"^module\.", "", k): v.float() for k, v in checkpoint["state_dict"].items()}
    state = {_prefix_text_keys(k): v for k, v in state.items()}
    width = state["visual.patch_embed.proj.weight"].shape[0]
    patch = state["visual.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual.pos_embed"].shape[1] - 1) ** 0.5)
    arch: dict[str, Any] = dict(
        family="vit", patch_size=patch, image_size=patch * grid, vision_width=width,
        vision_heads=SLIP_VISION_HEADS[vision], vision_layers=_count_blocks(state, "visual.blocks."),
        inputs=SLIP_OBJECTIVE_INPUTS[objective], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    if "text_projection" in state:
        arch.update(_text_arch(state, "text."), embed_dim=state["text_projection"].shape[1])
    if "image_mlp.layer1.weight" in state:
        arch.update(ssl_mlp_dim=state["image_mlp.layer1.weight"].shape[0],
                    ssl_embed_dim=state["image_mlp.layer3.weight"].shape[0])
    return arch, state


def _identify(content: Any, path: Path) -> tuple[dict[str, Any], Mapping[str, torch.Tensor], CheckpointInfo]:
    """Recognise the format of an unpickled checkpoint and return (arch record, our state dict, info)."""
    if isinstance(content, Mapping) and content.get("format") == FORMAT_NAME:
        config = content.get("config")
        step = (content.get("state") or {}).get("step")
        info = CheckpointInfo(FORMAT_NAME, _objective_from_config(config), step, config)
        return dict(content["arch"]), content["model"], info
    if isinstance(content, Mapping) and "state_dict" in content and "args" in content:
        arch, state = _from_original_slip(content, path)
        objective = str(getattr(content["args"], "model", "")).partition("_")[0]
        return arch, state, CheckpointInfo("slip-original", SLIP_OBJECTIVE_NAMES.get(objective))
    if isinstance(content, Mapping) and "text_projection" in content and (
            "visual.layer1.0.conv1.weight" in content or "visual.proj" in content):
        return (*_from_openai(dict(content)), CheckpointInfo("openai-clip", "CLIPLoss"))
    kind = type(content).__name__
    keys = ", ".join(list(content)[:5]) if isinstance(content, Mapping) else ""
    raise CheckpointError(f"{path}: not a slip, original-SLIP or OpenAI-CLIP checkpoint ({kind} with keys: {keys})")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of this toolkit's checkpoints (e.g. a training run's last.pt) safely, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _is_torchscript_archive(path):
        raise CheckpointError(f"{path}: a TorchScript archive, not a slip checkpoint "
                              "(only load_pretrained reads TorchScript, and uses only its tensors)")
    content = _read_file(path)
    if not (isinstance(content, Mapping) and content.get("format") == FORMAT_NAME):
        raise CheckpointError(f"{path}: not a slip checkpoint")
    return dict(content)


def _describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
    return "; ".join(parts)


def load_pretrained(path: str | os.PathLike) -> ImageTextModel:
    """Load a model in eval mode from our checkpoints, original SLIP checkpoints or OpenAI CLIP weights."""
    return load_pretrained_with_info(path)[0]


def load_pretrained_with_info(path: str | os.PathLike) -> tuple[ImageTextModel, CheckpointInfo]:
    """`load_pretrained`, plus what the checkpoint records about its training (format, objective, step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _is_torchscript_archive(path):
        arch, state = _from_openai(_read_torchscript_tensors(path))
        info = CheckpointInfo("openai-clip", "CLIPLoss")
    else:
        arch, state, info = _identify(_read_file(path), path)
    try:
        model = build_from_arch(arch)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot build its architecture {arch}: {error}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not fit the architecture: {first_line}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the architecture: "
                              f"{_describe_mismatch(missing, unexpected)}")
    return model.eval(), info


__all__ = ["CheckpointError", "CheckpointInfo", "atomic_save", "atomic_write", "load_pretrained",
           "load_pretrained_with_info", "model_checkpoint", "read_checkpoint", "save_model"]
