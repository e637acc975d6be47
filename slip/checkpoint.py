"""Our checkpoint files: atomic saving, and safe reading (only tensors and plain data are unpickled).

Reading other formats, and `load_pretrained`, are `slip.interop` and `slip.pretrained`.
"""
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
import yaml

from slip.error_text import first_line, named_one_line
from slip.models import ImageTextModel, ModelSpec, spec_from_legacy_arch

FORMAT_NAME = "slip"
FORMAT_VERSION = 2  # 2: the model spec under "spec" (ModelSpec.to_dict); 1: the flat record under "arch"

# Types besides tensors and containers that the supported formats pickle: SLIP keeps argparse args.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a model; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about how its weights were trained (None where its format does not record it)."""

    format: str  # "slip", "slip-original", "openai-clip", "open_clip", "hf-clip" or "safetensors"
    objective: str | None = None  # the objective's class name, e.g. "SLIPLoss"
    step: int | None = None
    config: str | None = None  # the resolved training config (YAML), for our own checkpoints
    # The objective's learned logit bias (SigLIP), exactly as saved: the model's scores are then
    # sigmoid(exp(logit_scale) * cosine + logit_bias). The bias belongs to the objective, not the model.
    logit_bias: float | None = None
    weights: str = "model"  # "model": the trained weights; "ema": the momentum teacher's average of them


LOGIT_BIAS = "logit_bias"


def find_logit_bias(objective_state: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """The key and value of the one logit bias in an objective's state dict (`logit_bias` for SigLIPLoss,
    `objectives.<name>.logit_bias` inside a weighted sum); None where there is none, or several."""
    found = [(key, value) for key, value in objective_state.items() if key.rsplit(".", 1)[-1] == LOGIT_BIAS]
    return found[0] if len(found) == 1 and found[0][1].numel() == 1 else None


def logit_bias_value(objective_state: Mapping[str, torch.Tensor]) -> float | None:
    """`find_logit_bias`'s value as a Python float (exact: float has every float32 / bfloat16 value)."""
    found = find_logit_bias(objective_state)
    return None if found is None else float(found[1])


def objective_from_config(config_text: str | None) -> str | None:
    """The objective class name recorded in a training config's loss._target_."""
    config = yaml.safe_load(config_text or "{}")
    loss = config.get("loss") if isinstance(config, dict) else None
    target = loss.get("_target_") if isinstance(loss, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def model_checkpoint(model: ImageTextModel, objective: torch.nn.Module | None = None) -> dict[str, Any]:
    """The dict that stores a model in this toolkit's format: its spec (plain data) plus weights, and with
    `objective` its state dict under "objective" as training checkpoints keep it (SigLIP's learned bias)."""
    content = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "model": model.state_dict(),
    }
    if objective is not None:
        content["objective"] = objective.state_dict()
    return content


def spec_of(content: Mapping[str, Any], path: str | os.PathLike) -> ModelSpec:
    """The model spec a checkpoint (or safetensors metadata) keeps: "spec" since format 2, the flat "arch" record
    of earlier versions otherwise; a one-line CheckpointError naming `path` where it is not a valid spec."""
    try:
        if "spec" in content:
            return ModelSpec.from_dict(content["spec"])
        if "arch" in content:
            return spec_from_legacy_arch(content["arch"])
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot read its model spec: {first_line(error)}") from None
    raise CheckpointError(f"{path}: keeps no model spec (\"spec\", or \"arch\" before format 2)")


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


def save_model(model: ImageTextModel, path: str | os.PathLike, objective: torch.nn.Module | None = None) -> Path:
    """Write `model` atomically in this toolkit's checkpoint format; pass the training `objective` to keep its
    parameters too (SigLIP's logit bias, which `load_pretrained_with_info` reports)."""
    return atomic_save(model_checkpoint(model, objective), path)


def is_torchscript_archive(path: Path) -> bool:
    """Whether `path` is a TorchScript zip archive (code and constants besides tensors)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.search(r"(^|/)(code/|constants\.pkl$)", name) for name in archive.namelist())


def read_safely(path: Path) -> Any:
    """Unpickle with weights_only=True; only tensors, containers and SAFE_GLOBALS are reconstructed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to unpickle (only tensors and plain data are allowed): "
                              f"{first_line(error)}") from None
    # Garbage that happens to parse as a legacy pickle fails anywhere in the unpickler: IndexError, KeyError,
    # UnicodeDecodeError, ... (about 6% of random 1 kB files); every such failure means the same thing.
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({named_one_line(error)})") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of this toolkit's checkpoints (a training run's last.pt, or its sharded last.dcp directory)
    safely, as a dict with full tensors."""
    path = Path(path)
    from slip.sharded_checkpoint import is_sharded_checkpoint, read_sharded  # it writes with atomic_save

    if is_sharded_checkpoint(path):
        content = read_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or sharded checkpoint directory")
    elif is_torchscript_archive(path):
        raise CheckpointError(f"{path}: a TorchScript archive, not a slip checkpoint "
                              "(only load_pretrained reads TorchScript, and uses only its tensors)")
    else:
        content = read_safely(path)
    if not (isinstance(content, Mapping) and content.get("format") == FORMAT_NAME):
        raise CheckpointError(f"{path}: not a slip checkpoint")
    return dict(content)


__all__ = ["LOGIT_BIAS", "CheckpointError", "CheckpointInfo", "atomic_save", "atomic_write", "find_logit_bias",
           "is_torchscript_archive", "logit_bias_value", "model_checkpoint", "objective_from_config",
           "read_checkpoint", "read_safely", "save_model", "spec_of"]
