"""Smoke example (until `python -m slip.train` lands): a few SLIP steps of a tiny model on CPU."""
from __future__ import annotations

import torch

from slip.losses import SLIPLoss
from slip.models import vit_ti16
from slip.tokenizer import tokenize

CAPTIONS = ["a small red circle above a large blue square", "a green triangle", "two yellow stars", "a cat"]


def main() -> None:
    """Train a tiny ViT-Ti SLIP model for 10 steps on one fixed batch and print the loss terms."""
    torch.manual_seed(0)
    objective = SLIPLoss(ssl_scale=1.0)
    model = vit_ti16(image_size=32, vision_layers=2, text_width=64, text_layers=2, text_heads=1,
                     ssl_mlp_dim=128, ssl_embed_dim=32, inputs=objective.inputs)
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()], lr=1e-3)
    batch = {view: torch.randn(len(CAPTIONS), 3, 32, 32) for view in ("image", "aug1", "aug2")}
    batch["text"] = tokenize(CAPTIONS)
    for step in range(10):
        result = objective(model(batch))
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        print(f"step {step}: " + ", ".join(f"{k}={v.item():.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
