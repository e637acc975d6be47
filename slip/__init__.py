"""slip: multi-objective image-text pretraining (CLIP, SimCLR, SLIP, SigLIP)."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each. They are imported on first use, so that light entry points
# (python -m slip.report, DataLoader workers) do not pay for importing torch and timm up front.
_EXPORTS = {
    "create_model": "slip.api",
    "create_model_and_transforms": "slip.api",
    "get_tokenizer": "slip.api",
    "model_names": "slip.api",
    "zero_shot_classifier": "slip.api",
    "export": "slip.export",
    "load_pretrained": "slip.pretrained",
    "save_safetensors": "slip.interop.safetensors_io",
    "save_model": "slip.checkpoint",
    "CLIPLoss": "slip.losses",
    "Objective": "slip.losses",
    "SigLIPLoss": "slip.losses",
    "SimCLRLoss": "slip.losses",
    "SLIPLoss": "slip.losses",
    "ComposedObjective": "slip.losses",
    "Term": "slip.losses",
    "MODEL_BUILDERS": "slip.models",
    "ImageTextModel": "slip.models",
    "ModelSpec": "slip.models",
    "list_models": "slip.models",
    "register_model": "slip.models",
    "build_resnet_model": "slip.models",
    "build_vit_model": "slip.models",
    "decode": "slip.tokenizer",
    "tokenize": "slip.tokenizer",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slip' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
