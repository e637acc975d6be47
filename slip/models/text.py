"""CLIP's causal text Transformer, pooled at the end-of-text token, running on length-trimmed batches."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(1.702 x)."""
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.MultiheadAttention's parameter names, computed with SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> [B, L, W], each position attending to itself and earlier positions."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a QuickGELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to [B, L, W]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks`, as in CLIP's checkpoints)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run all blocks on [B, L, W]; with `grad_checkpointing`, activations are recomputed in backward."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.resblocks(x)
        for block in self.resblocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


class TextTransformer(nn.Module):
    """Token + positional embeddings, causal Transformer, final LayerNorm; features at the EOT token (the sizes are
    checked by the `TextSpec` that builds it)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 trim: bool = True) -> None:
        super().__init__()
        self.context_length = context_length
        self.num_features = width
        self.trim = trim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation of embeddings and residual branches (output projections scaled by depth)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (EOT has the largest id in each row) -> [B, width] features at the EOT position.

        With `trim`, columns after the last EOT of the batch are dropped first: causal attention means
        the EOT output never depends on them, so the result is the same at a fraction of the cost.
        """
        if tokens.dim() != 2:
            raise ValueError(f"text tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text has {tokens.shape[1]} tokens but the model's context_length is {self.context_length}"
            )
        eot_index = tokens.argmax(dim=-1)
        if self.trim and tokens.shape[0] > 0:
            tokens = tokens[:, : int(eot_index.max()) + 1]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x)
        # LayerNorm is per position, so normalising only the pooled rows is exact.
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_index])
