"""`load_pretrained`: a model in eval mode from any file or directory slip reads.

Recognised, in this order: a transformers CLIPModel directory and an open_clip directory (`slip.interop.hf`,
`slip.interop.open_clip`); a `.safetensors` file written by slip; our own `.pt` checkpoints; original SLIP
checkpoints; OpenAI CLIP weights (its TorchScript archives and plain state dicts, which are also what open_clip's
OpenAI-style models save). Pickles are read with `weights_only=True`; TorchScript code is never run.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slip.checkpoint import (FORMAT_NAME, CheckpointError, CheckpointInfo, is_torchscript_archive,
                             logit_bias_value, objective_from_config, read_safely, spec_of)
from slip.interop.common import Converted
from slip.interop.hf import read_hf
from slip.interop.open_clip import read_open_clip
from slip.interop.openai import from_openai, is_openai_state, read_torchscript_tensors
from slip.interop.safetensors_io import read_safetensors
from slip.interop.slip_original import from_original_slip, is_original_slip
from slip.models import ImageTextModel, build_model
from slip.sharded_checkpoint import is_sharded_checkpoint, read_sharded

__all__ = ["WEIGHTS", "build_converted", "load_pretrained", "load_pretrained_with_info", "read_pretrained"]

# Which weights of a checkpoint to read: the trained model's, or the EMA its momentum teacher kept (`slip.teacher`).
WEIGHTS = ("model", "ema")


def _no_ema_in(path: Path) -> CheckpointError:
    """The error for weights="ema" on a format that keeps no momentum teacher."""
    return CheckpointError(f"{path}: only slip's own checkpoints (.pt, or sharded .dcp) keep EMA weights")


def _ema_state(content: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The momentum teacher's copy of the model in one of our checkpoints."""
    teacher = content.get("teacher")
    if not isinstance(teacher, Mapping):
        raise CheckpointError(f"{path}: holds no EMA weights (its run kept no momentum teacher: train with a "
                              f"distilling objective or teacher.always=true)")
    return {key.removeprefix("model."): value for key, value in teacher.items() if key.startswith("model.")}


def _from_pickle(content: Any, path: Path, weights: str) -> Converted:
    """Recognise the format of an unpickled checkpoint."""
    if isinstance(content, Mapping) and content.get("format") == FORMAT_NAME:
        if content.get("classifier") is not None:
            raise CheckpointError(f"{path}: a fine-tuned classifier (python -m slip.finetune), not an image-text "
                                  "model; read it with slip.classifier.load_classifier")
        config = content.get("config")
        step = (content.get("state") or {}).get("step")
        objective_state = content.get("objective") or {}
        if not (isinstance(objective_state, Mapping)
                and all(isinstance(value, torch.Tensor) for value in objective_state.values())):
            raise CheckpointError(f"{path}: its \"objective\" entry is not a state dict of tensors")
        info = CheckpointInfo(FORMAT_NAME, objective_from_config(config), step, config,
                              logit_bias_value(objective_state), weights)
        state = _ema_state(content, path) if weights == "ema" else content["model"]
        return Converted(spec_of(content, path), state, info, dict(objective_state))
    if weights != "model":
        raise _no_ema_in(path)
    if is_original_slip(content):
        return from_original_slip(content, path)
    if is_openai_state(content):
        return from_openai(dict(content))
    kind = type(content).__name__
    keys = ", ".join(map(str, list(content)[:5])) if isinstance(content, Mapping) else ""
    raise CheckpointError(f"{path}: not a slip, original-SLIP, OpenAI-CLIP or open_clip (OpenAI-style) checkpoint "
                          f"({kind} with keys: {keys})")


def read_pretrained(path: str | os.PathLike, weights: str = "model") -> Converted:
    """The model spec, state dict and provenance of the model at `path`, in our terms, without building it;
    `weights="ema"` reads the momentum teacher's average of the weights instead (our `.pt` checkpoints only)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _from_pickle(read_sharded(path), path, weights)
    if weights != "model" and (path.is_dir() or path.suffix == ".safetensors"):
        raise _no_ema_in(path)
    if path.is_dir():
        for reader in (read_hf, read_open_clip):
            converted = reader(path)
            if converted is not None:
                return converted
        present = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise CheckpointError(f"{path}: a directory that is no transformers CLIP (config.json + model.safetensors) "
                              f"or open_clip (open_clip_config.json + weights) model; it holds {present}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if is_torchscript_archive(path):
        if weights != "model":
            raise _no_ema_in(path)
        return from_openai(read_torchscript_tensors(path))
    return _from_pickle(read_safely(path), path, weights)


def _describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
    return "; ".join(parts)


def build_converted(converted: Converted, path: Path) -> ImageTextModel:
    """The model a converted checkpoint describes, its weights loaded strictly, in eval mode."""
    try:
        model = build_model(converted.spec)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot build its architecture {converted.spec}: {error}") from None
    try:
        missing, unexpected = model.load_state_dict(converted.state, strict=False)
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1].strip()  # load_state_dict's own reason comes last
        raise CheckpointError(f"{path}: weights do not fit the architecture: {last_line}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the architecture: "
                              f"{_describe_mismatch(missing, unexpected)}")
    return model.eval()


def load_pretrained(path: str | os.PathLike, weights: str = "model") -> ImageTextModel:
    """A model in eval mode from any format `read_pretrained` recognises (`weights="ema"`: the momentum teacher's
    EMA of the weights that one of our checkpoints keeps)."""
    return load_pretrained_with_info(path, weights)[0]


def load_pretrained_with_info(path: str | os.PathLike,
                              weights: str = "model") -> tuple[ImageTextModel, CheckpointInfo]:
    """`load_pretrained`, plus what the checkpoint records about its training (format, objective, step, and
    SigLIP's learned logit bias where the file keeps it)."""
    converted = read_pretrained(path, weights)
    return build_converted(converted, Path(path)), converted.info
