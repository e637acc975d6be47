"""Shared by the checkpoint tests: small models in the original implementations' layouts, written as the files
`slip.load_pretrained` reads (OpenAI CLIP state dicts and TorchScript archives, original SLIP checkpoints)."""
from __future__ import annotations

import argparse
import copy
import types
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

# The text tower of the OpenAI-layout models: OpenAI's context and vocabulary, at a CPU-test width and depth.
OPENAI_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                   transformer_layers=2)


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every weight and batch statistic off its initial value, so zero-inits can't hide a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            else:
                tensor.add_(0.05 * noise)
    return module


def images(size: int, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """[batch, 3, size, size] standard normal pixels from a seeded generator."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- OpenAI CLIP


def openai_vit(openai_clip: types.ModuleType) -> nn.Module:
    """OpenAI's CLIP with a 2-layer ViT image tower at 32 px (patch 8), perturbed, in eval mode."""
    torch.manual_seed(0)
    model = openai_clip.model.CLIP(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128,
                                   vision_patch_size=8, **OPENAI_TEXT)
    return perturb(model).eval()


def openai_resnet(openai_clip: types.ModuleType) -> nn.Module:
    """OpenAI's CLIP with a ModifiedResNet image tower (stages 1, 2, 1, 1, width 16) at 64 px, perturbed, eval."""
    torch.manual_seed(0)
    model = openai_clip.model.CLIP(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1),
                                   vision_width=16, vision_patch_size=None, **OPENAI_TEXT)
    return perturb(model).eval()


def save_openai_state_dict(reference: nn.Module, path: Path, resolution: int) -> Path:
    """Write `reference`'s state dict to `path` as OpenAI released theirs, with the three entries besides the
    weights (input_resolution, context_length, vocab_size)."""
    state = dict(reference.state_dict())
    state.update(input_resolution=torch.tensor(resolution), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    torch.save(state, path)
    return path


def save_openai_torchscript(reference: nn.Module, path: Path, resolution: int, openai_clip: types.ModuleType) -> Path:
    """Trace `reference` and save it to `path` as OpenAI's released TorchScript archives are (their three size
    attributes as buffers); tracing warns with torch.jit.TracerWarning."""
    scripted_source = copy.deepcopy(reference)
    for name, value in (("input_resolution", resolution), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(scripted_source, name):
            delattr(scripted_source, name)  # a plain int attribute there; the released archives hold tensors
        scripted_source.register_buffer(name, torch.tensor(value))
    example = (images(resolution, batch=2), openai_clip.tokenize(["a", "b"]))
    traced = torch.jit.trace(scripted_source, example, check_trace=False)
    traced.save(str(path))
    return path


# ---------------------------------------------------------------- original SLIP


def reference_ssl_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """SLIP's image_mlp as the paper defines it: Linear-BN-ReLU-Linear-BN-ReLU-Linear."""
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, hidden)), ("bn1", nn.BatchNorm1d(hidden)), ("relu1", nn.ReLU()),
        ("layer2", nn.Linear(hidden, hidden)), ("bn2", nn.BatchNorm1d(hidden)), ("relu2", nn.ReLU()),
        ("layer3", nn.Linear(hidden, out)),
    ]))


def original_slip_parts(openai_clip: types.ModuleType, objective: str) -> dict[str, nn.Module | torch.Tensor]:
    """The modules the SLIP code builds for `objective` with a ViT-S/16 at 64 px and a small text tower."""
    torch.manual_seed(0)
    parts: dict[str, nn.Module | torch.Tensor] = {
        "visual": perturb(timm.models.vision_transformer.VisionTransformer(
            img_size=64, patch_size=16, embed_dim=384, depth=12, num_heads=12, num_classes=0)).eval(),
    }
    if objective in ("SLIP", "CLIP"):
        parts["clip"] = perturb(openai_clip.model.CLIP(
            embed_dim=96, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
            **OPENAI_TEXT)).eval()
        parts["image_projection"] = torch.randn(384, 96) * 384**-0.5
    if objective in ("SLIP", "SIMCLR"):
        parts["image_mlp"] = perturb(reference_ssl_mlp(384, 64, 32)).eval()
    return parts


def original_slip_checkpoint(parts: dict, model_name: str) -> dict:
    """The checkpoint SLIP's main.py saves for `parts` (DDP's "module." prefixes, its argparse namespace)."""
    state: dict[str, torch.Tensor] = {f"visual.{k}": v for k, v in parts["visual"].state_dict().items()}
    if "clip" in parts:
        text_state = parts["clip"].state_dict()
        state.update({k: v for k, v in text_state.items() if not k.startswith("visual.")})
        state["image_projection"] = parts["image_projection"]
    if "image_mlp" in parts:
        state.update({f"image_mlp.{k}": v for k, v in parts["image_mlp"].state_dict().items()})
    return {
        "epoch": 25,
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "args": argparse.Namespace(model=model_name, ssl_scale=1.0, lr=3e-3),
        "best_acc1": 42.0,
    }
