"""A model's weights as `.safetensors` (no pickle at all), with its architecture and provenance as metadata.

Our `.pt` checkpoints keep the training state; this file keeps only what `load_pretrained` needs: every tensor of
the model (the SSL head included), the training objective's tensors under "objective." (SigLIP's learned
`objective.logit_bias`; no model key starts so) and, in the header's metadata, the model spec (JSON; "arch", the
flat record, in files of earlier versions) and what the
run says about itself (objective, step).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from slip.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointInfo, atomic_write, logit_bias_value, spec_of
from slip.interop.common import Converted
from slip.models import ImageTextModel

__all__ = ["OBJECTIVE_PREFIX", "read_safetensors", "save_safetensors"]

_FORMAT = "slip-safetensors"
OBJECTIVE_PREFIX = "objective."


def _library():
    try:
        import safetensors.torch
    except ImportError:  # an optional extra
        raise CheckpointError("safetensors is not installed: pip install 'slip[interop]' (or safetensors)") from None
    return safetensors.torch


def save_safetensors(model: ImageTextModel, path: str | Path, info: CheckpointInfo | None = None,
                     objective_state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write `model`'s tensors, the objective's (`objective_state`, e.g. SigLIP's logit bias) and the model spec
    to `path` atomically, in safetensors format."""
    library = _library()
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    state.update({OBJECTIVE_PREFIX + key: value.detach().contiguous().cpu()
                  for key, value in (objective_state or {}).items()})
    metadata = {"format": _FORMAT, "format_version": str(FORMAT_VERSION), "spec": json.dumps(model.spec.to_dict())}
    if info is not None:
        metadata.update({key: str(value) for key, value in (("objective", info.objective), ("step", info.step))
                         if value is not None})
    data = library.save(state, metadata=metadata)
    return atomic_write(path, lambda handle: handle.write(data))


def read_safetensors(path: Path) -> Converted | None:
    """A `.safetensors` file written by `save_safetensors` in our terms; None for a file of another kind."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    library = _library()
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size)) if 0 < header_size < 100 << 20 else None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    metadata = (header or {}).get("__metadata__") or {}
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without slip's metadata (format="
                              f"{metadata.get('format')!r}); for open_clip or transformers weights pass their "
                              "directory, which holds the config")
    try:
        records = {key: json.loads(metadata[key]) for key in ("spec", "arch") if key in metadata}
        state = library.load_file(str(path))
    except (KeyError, ValueError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable slip safetensors file ({type(error).__name__}: {error})") from None
    spec = spec_of(records, path)
    objective_state = {key[len(OBJECTIVE_PREFIX):]: value for key, value in state.items()
                       if key.startswith(OBJECTIVE_PREFIX)}
    model_state = {key: value for key, value in state.items() if not key.startswith(OBJECTIVE_PREFIX)}
    step = metadata.get("step")
    info = CheckpointInfo("safetensors", metadata.get("objective"), int(step) if step and step.isdigit() else None,
                          logit_bias=logit_bias_value(objective_state))
    return Converted(spec, model_state, info, objective_state)

