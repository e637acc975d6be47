"""Image towers: timm Vision Transformers and CLIP's ModifiedResNet, each mapping images to a feature vector."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from typing import Sequence

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def vit_tower(*, image_size: int, patch_size: int, width: int, depth: int, heads: int, openai_layout: bool,
              drop_path_rate: float = 0.0, patch_dropout: float = 0.0) -> VisionTransformer:
    """A timm ViT without classifier head whose output is the class-token feature of size `width` (the sizes are
    checked by the `ViTSpec` that builds it).

    `patch_dropout` > 0 adds timm's PatchDropout after the positional embeddings (FLIP): in training each image
    keeps a uniformly random subset of its patch tokens (and the class token); `set_patch_dropout` changes the
    rate per call. In eval mode every token is used.

    `openai_layout=False` is timm's standard ViT as SLIP uses it (GELU, LayerNorm eps 1e-6, patch bias);
    `openai_layout=True` is the layout of OpenAI CLIP's ViTs (LayerNorm before the blocks, QuickGELU,
    LayerNorm eps 1e-5, no patch-embedding bias).

    Images of other sides (a multiple of `patch_size`; local crops) are embedded with the positional embedding
    resampled to their patch grid, as timm's `dynamic_img_size` does it (`resample_abs_pos_embed`: bicubic,
    antialiased); at `image_size` the embedding is used as it is, and the output is bit-identical to a tower
    built without it.
    """
    layout: dict = {}
    if openai_layout:
        layout = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer="quick_gelu")
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=0,
        global_pool="token",
        drop_path_rate=drop_path_rate,
        patch_drop_rate=patch_dropout,
        dynamic_img_size=True,
        **layout,
    )


def check_patch_dropout(name: str, rate: float) -> float:
    """`rate` as a float, or a one-line ValueError naming `name` unless 0 <= rate < 1."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {rate!r}")
    return float(rate)


@contextlib.contextmanager
def patch_dropout_rate(tower: nn.Module, rate: float) -> Iterator[None]:
    """Inside the block, `tower`'s PatchDropout (built with a rate > 0) drops `rate` of the patch tokens."""
    dropout = getattr(tower, "patch_drop", None)
    if not isinstance(dropout, PatchDropout):
        if rate:
            raise ValueError(f"patch dropout {rate} needs a ViT tower built with patch_dropout > 0")
        yield
        return
    previous, dropout.prob = dropout.prob, rate
    try:
        yield
    finally:
        dropout.prob = previous


@contextlib.contextmanager
def scratch_buffers(module: nn.Module) -> Iterator[None]:
    """Inside the block, `module`'s buffers are copies whose updates are dropped after it.

    The originals are swapped out rather than restored in place: a graph may have saved some of them
    (BatchNorm saves its running statistics for backward), and autograd refuses tensors modified after saving.
    """
    slots = [(owner, name, buffer) for owner in module.modules()
             for name, buffer in owner.named_buffers(recurse=False)]
    for owner, name, buffer in slots:
        setattr(owner, name, buffer.clone())
    try:
        yield
    finally:
        for owner, name, buffer in slots:
            setattr(owner, name, buffer)


def _recompute_on_scratch_buffers(
        module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), scratch_buffers(module)


def checkpoint_keeping_buffers(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`module(inputs)`, its activations recomputed in backward by a pass whose buffer updates are dropped.

    Only the forward updates buffers, so BatchNorm's running statistics move once per call, as without
    checkpointing; the recomputation reads copies of their values at that time.
    """
    if torch.compiler.is_compiling():
        # The compiled graph applies buffer updates once, after its forward, and its recomputation only
        # recomputes; torch.compile also refuses a `context_fn` other than selective checkpointing's.
        return torch.utils.checkpoint.checkpoint(module, inputs, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(module, inputs, use_reentrant=False,
                                             context_fn=partial(_recompute_on_scratch_buffers, module))


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: strided convolutions are replaced by an average pool after conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck transform."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: the mean of the feature map attends over all positions."""

    def __init__(self, grid_size: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"attention-pool width={embed_dim} is not divisible by heads={heads}")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid_size**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] feature map -> [B, output_dim]."""
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        batch, length, width = tokens.shape
        head_dim = width // self.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        query = split_heads(self.q_proj(tokens[:, :1]))
        key = split_heads(self.k_proj(tokens))
        value = split_heads(self.v_proj(tokens))
        pooled = F.scaled_dot_product_attention(query, key, value)  # [B, heads, 1, head_dim]
        return self.c_proj(pooled.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with average pooling, anti-aliased bottlenecks and attention pooling.

    `channels_last` keeps the convolution weights and activations in NHWC layout, which oneDNN on CPU and
    cuDNN on GPU convolve without reordering (the same function of the same weights, to float rounding). The sizes
    are checked by the `ResNetSpec` that builds it.
    """

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int, width: int,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.num_features = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for index, depth in enumerate(layers):
            planes = width * 2**index
            blocks = [Bottleneck(inplanes, planes, stride=1 if index == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(1, depth)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.grad_checkpointing = False
        self.image_size = image_size
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.initialize_parameters()
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def no_weight_decay(self) -> set[str]:
        """Parameters of two or more dimensions that weight decay leaves alone (timm's convention): the
        attention pool's positional embedding."""
        return {"attnpool.positional_embedding"}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups in depth order, by timm's convention for its ResNets: the stem, then each residual
        block (each stage when `coarse`); the attention pool falls in the top group. timm's layer decay reads it."""
        return {"stem": r"^conv[123]|^bn[123]", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def initialize_parameters(self) -> None:
        """CLIP's initialisation: scaled attention-pool projections, zero-gamma last BN of each block."""
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, output_dim]; the feature map must have the attention pool's grid (`image_size` px)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.relu1(self.bn1(self.conv1(images)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_keeping_buffers(stage, x)
            else:
                x = stage(x)
        grid = self.image_size // 32
        if x.shape[-2:] != (grid, grid):
            raise ValueError(f"the ModifiedResNet tower takes {self.image_size} px images only (its attention pool's "
                             f"positional embedding is for a {grid}x{grid} grid), got {images.shape[-2]}x"
                             f"{images.shape[-1]} px")
        return self.attnpool(x)


def has_batch_statistics(module: nn.Module) -> bool:
    """Whether any submodule normalises with batch statistics, so samples in one batch affect each other."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
