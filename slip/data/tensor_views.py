"""The SLIP views computed on tensors: the recipes of `transforms.clip_view` and `transforms.ssl_view`, draw for
draw, with fewer and cheaper operations than torchvision's PIL path.

- Random draws are the same, in the same order, as the torchvision pipelines of `transforms`, so under one seed
  both paths pick the same crops, jitter factors, blur widths and flips.
- The crop is resized from uint8 with torch's antialiased bilinear kernel (the uint8 AVX2 path, on
  channels-last pixels), then everything is planar float32 in [0, 1], changed in place on the view's own
  tensor: brightness, contrast and saturation are torchvision's blends; the hue shift is the HSV rotation
  written as one closed form per channel (max and min of a pixel are kept, the middle channel moves); the blur
  is a separable Gaussian truncated at 3 standard deviations with reflected borders.
- Against torchvision's float-tensor functions each step agrees to float rounding; against the PIL path,
  which rounds to uint8 after every step and stores hue in 256 levels, views differ by a few levels out of 255
  (tests/test_tensor_views.py states the bounds).
- An SSL view is drawn first (crop box and an operations row: `SSL_OPERATIONS` columns), then applied. The
  colour, blur and flip operations run on a batch of views with one operations row each
  (`apply_ssl_operations`), so a view can also be *deferred*: the worker ships the uint8 crop and its row
  (`DeferredView`) and `finish_views` completes a whole batch on the training device.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "SSL_OPERATIONS",
    "DeferredView",
    "TensorClipView",
    "TensorSSLView",
    "adjust_hue",
    "apply_ssl_operations",
    "color_jitter",
    "finish_views",
    "gaussian_blur",
    "image_to_tensor",
    "sample_crop",
    "sample_jitter",
]

ASPECT_RATIO = (3 / 4, 4 / 3)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (and so its contrast and saturation)
JITTER_STEPS = 4  # ColorJitter's brightness, contrast, saturation and hue, in a drawn order
# Columns of an SSL view's operations row: the jitter operation at each step (0 brightness, 1 contrast,
# 2 saturation, 3 hue; -1 none) and its factor, then grayscale (0/1), the blur's sigma (0: no blur), flip (0/1).
JITTER_OPS, JITTER_FACTORS = slice(0, JITTER_STEPS), slice(JITTER_STEPS, 2 * JITTER_STEPS)
GRAYSCALE, BLUR_SIGMA, HFLIP = 2 * JITTER_STEPS, 2 * JITTER_STEPS + 1, 2 * JITTER_STEPS + 2
SSL_OPERATIONS = 2 * JITTER_STEPS + 3


class DeferredView(NamedTuple):
    """A view drawn but not finished: its uint8 crop [3, S, S] and its operations row ([SSL_OPERATIONS], or [0]
    for a plain crop). The loader's collation stacks each field over the batch."""

    pixels: Tensor
    operations: Tensor


def image_to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a uint8 tensor [3, H, W] (a channels-last view of one copy of the pixels)."""
    return TF.pil_to_tensor(image) if image.mode == "RGB" else TF.pil_to_tensor(image.convert("RGB"))


def sample_crop(height: int, width: int, scale: Sequence[float],
                ratio: Sequence[float] = ASPECT_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, drawn exactly as torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32, as torchvision rounds it
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height  # ten misses: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter_range(value: float, center: float, lowest: float) -> tuple[float, float] | None:
    """torchvision's factor range for a jitter strength: None where it would always be the identity."""
    low, high = max(center - value, lowest), center + value
    return None if low == high == center else (low, high)


def sample_jitter(brightness: float, contrast: float, saturation: float,
                  hue: float) -> list[tuple[int, float]]:
    """The (operation, factor) pairs of one ColorJitter call, in the order and with the draws torchvision uses.

    Operations: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    """
    order = torch.randperm(4).tolist()
    ranges = [_jitter_range(brightness, 1.0, 0.0), _jitter_range(contrast, 1.0, 0.0),
              _jitter_range(saturation, 1.0, 0.0), _jitter_range(hue, 0.0, -math.inf)]
    factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1]).item()) for r in ranges]
    return [(op, factors[op]) for op in order if factors[op] is not None]


def _gray(image: Tensor) -> Tensor:
    """Luma [..., 1, H, W] of float RGB images [..., 3, H, W]."""
    r, g, b = image.unbind(-3)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the HSV hue of a float RGB image in [0, 1] by `shift` turns (torchvision's adjust_hue)."""
    return _adjust_hue_(image.clone(), shift)


def _adjust_hue_(image: Tensor, shift: float | Tensor) -> Tensor:
    """`adjust_hue` in place on contiguous images [..., 3, H, W]; `shift` a number, or one per image [..., 1, 1].

    A hue rotation keeps each pixel's max and min channel, so with t_c = clamp(|h - centre_c| - 1, 0, 1)
    (h the rotated hue in sixths of a turn, centres 3, 2, 4 for R, G, B), R = min + chroma * t_R and
    G, B = max - chroma * t_G, t_B: the piecewise-linear colour wheel, one plane at a time.
    """
    r, g, b = image.unbind(-3)
    high = torch.maximum(torch.maximum(r, g), b)  # elementwise: much faster than aminmax over channels
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = high - low
    # Hue in sixths of a turn, in [-1, 5): the max channel picks the sector (r before g before b, as in
    # torchvision; where two channels tie for the max, their sectors give the same hue anyway).
    is_g = torch.eq(high, g, out=torch.empty_like(high))
    is_r = torch.eq(high, r, out=torch.empty_like(high))
    hue = (r - g).add_(chroma, alpha=4.0)
    hue.lerp_((b - r).add_(chroma, alpha=2.0), is_g)  # a 0/1 weight: exactly one or the other
    hue.lerp_(g - b, is_r)
    hue.div_(chroma.clamp_min(1e-12)).add_(shift * 6.0)  # chroma 0: the hue is unused
    hue.sub_(torch.floor(hue * (1.0 / 6.0)).mul_(6.0))  # into [0, 6); 3x faster than remainder_
    for plane, centre in zip(image.unbind(-3), (3.0, 2.0, 4.0)):
        torch.sub(hue, centre, out=plane).abs_().sub_(1.0).clamp_(0.0, 1.0)
    torch.addcmul(low, chroma, r, out=r)
    torch.addcmul(high, chroma, g, value=-1.0, out=g)
    torch.addcmul(high, chroma, b, value=-1.0, out=b)
    return image


def _add_scaled_(target: Tensor, addend: Tensor, factor: float | Tensor) -> Tensor:
    """target += addend * factor, in place; a plain-number factor takes the scalar kernel (no broadcast tensor)."""
    return target.add_(addend, alpha=factor) if isinstance(factor, float) else target.addcmul_(addend, factor)


def _jitter_step_(image: Tensor, operation: int, factor: float | Tensor) -> Tensor:
    """One ColorJitter operation in place on images [..., 3, H, W], clamped as torchvision clamps it.

    `factor` is a number or one per image [..., 1, 1, 1].
    """
    if operation == 0:
        image.mul_(factor).clamp_(0.0, 1.0)
    elif operation == 1:
        # The mean of the luma is the luma of the channel means (one pass over the image).
        means = image.mean(dim=(-2, -1))
        if isinstance(factor, float):
            mean: float | Tensor = sum(w * m for w, m in zip(GRAY_WEIGHTS, means.reshape(-1).tolist()))  # one image
        else:
            mean = (means * means.new_tensor(GRAY_WEIGHTS)).sum(-1)[..., None, None, None]
        image.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, 1.0)
    elif operation == 2:
        gray = _gray(image)
        _add_scaled_(image.mul_(factor), gray, 1.0 - factor).clamp_(0.0, 1.0)
    else:
        _adjust_hue_(image, factor if isinstance(factor, float) else factor[..., 0, :, :])
    return image


def color_jitter(image: Tensor, operations: Sequence[tuple[int, float]]) -> Tensor:
    """Apply `sample_jitter`'s operations to a float RGB image in [0, 1], clamping after each as torchvision does."""
    image = image.clone()
    for operation, factor in operations:
        _jitter_step_(image, operation, factor)
    return image


def gaussian_kernel(sigma: float, radius: int | None = None) -> Tensor:
    """Normalised 1-D Gaussian weights over 2 * radius + 1 taps (default radius: ceil(3 sigma))."""
    radius = math.ceil(3 * sigma) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _blur_radius(sigma: float, height: int, width: int) -> int:
    """Taps each side: 3 standard deviations, or one pixel less than the shorter side (reflection needs that)."""
    return min(math.ceil(3 * sigma), min(height, width) - 1)


def _blur(images: Tensor, sigmas: Sequence[float], radius: int) -> Tensor:
    """Separable Gaussian blur of float images [N, C, H, W], one sigma per image, all over `radius` taps a side."""
    if len(sigmas) == 1:  # plain numbers: scalar kernels, faster than a one-element tensor
        taps: list = gaussian_kernel(sigmas[0], radius).tolist()
    else:  # one copy to the device for all the weights
        weights = torch.stack([gaussian_kernel(sigma, radius) for sigma in sigmas]).to(images.device)
        taps = [column.view(-1, 1, 1, 1) for column in weights.unbind(1)]
    for dim in (-1, -2):  # along the width, then the height
        size = images.shape[dim]
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        padded = F.pad(images, pad, mode="reflect")
        out = padded.narrow(dim, 0, size) * taps[0]
        for tap in range(1, len(taps)):
            _add_scaled_(out, padded.narrow(dim, tap, size), taps[tap])
        images = out
    return images


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a float image [C, H, W] with reflected borders (torchvision's gaussian_blur).

    The kernel reaches 3 standard deviations, or one pixel less than the image's shorter side on tiny images.
    """
    return _blur(image[None], [sigma], _blur_radius(sigma, *image.shape[1:]))[0]


def _on_rows(images: Tensor, chosen: Sequence[bool], operation: Callable[[Tensor, list[int]], Tensor]) -> Tensor:
    """`images` [B, ...] with `operation(those images, their row numbers)` applied to the rows `chosen` selects.

    In place when every row is chosen (one view at a time, or a batch that all drew it), else on a gathered
    copy that is scattered back.
    """
    rows = [row for row, selected in enumerate(chosen) if selected]
    if not rows:
        return images
    if len(rows) == len(chosen):
        return operation(images, rows)
    index = torch.tensor(rows).to(images.device, non_blocking=True)
    images[index] = operation(images[index], rows)
    return images


def _per_image(values: Sequence[float], device: torch.device) -> float | Tensor:
    """One factor per image: a plain number for one image (scalar kernels), else [N, 1, 1, 1] on `device`."""
    if len(values) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True).view(-1, 1, 1, 1)


def apply_ssl_operations(images: Tensor, operations: Tensor) -> Tensor:
    """Colour jitter, grayscale, blur and flip of float views [B, 3, S, S] in [0, 1] (contiguous), as drawn in
    `operations` [B, SSL_OPERATIONS] (a CPU tensor; see `TensorSSLView.draw`). Works in place where it can and
    returns the result; any device."""
    table = operations.tolist()  # float32 values as Python floats: exact, and ceil(3 sigma) as the view drew it
    drawn = sorted({(step, int(row[step])) for row in table for step in range(JITTER_STEPS) if row[step] >= 0})
    for step, operation in drawn:  # step by step; within a step each row has at most one operation
        images = _on_rows(images, [row[step] == operation for row in table],
                          lambda x, rows, step=step, operation=operation: _jitter_step_(
                              x, operation, _per_image([table[r][JITTER_STEPS + step] for r in rows], x.device)))
    images = _on_rows(images, [row[GRAYSCALE] > 0 for row in table],
                      lambda x, rows: _gray(x).expand_as(x).contiguous())
    radii = [_blur_radius(row[BLUR_SIGMA], *images.shape[-2:]) if row[BLUR_SIGMA] > 0 else 0 for row in table]
    for radius in sorted(set(radii) - {0}):  # one pass per kernel size: no zero taps, the per-view arithmetic
        images = _on_rows(images, [r == radius for r in radii], lambda x, rows, radius=radius: _blur(
            x, [table[r][BLUR_SIGMA] for r in rows], radius))
    return _on_rows(images, [row[HFLIP] > 0 for row in table], lambda x, rows: x.flip(-1))


class _Normalize:
    """Float in [0, 1] -> (x - mean) / std, in place, one channel plane at a time (faster than broadcasting)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = [1.0 / s for s in std]
        self.shift = [-m / s for m, s in zip(mean, std)]

    def __call__(self, images: Tensor) -> Tensor:
        """Images [..., 3, H, W], normalised (a contiguous copy first if they are not contiguous)."""
        images = images.contiguous()
        for plane, scale, shift in zip(images.unbind(-3), self.scale, self.shift):
            plane.mul_(scale).add_(shift)
        return images


def _resized_crop(image: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """The crop `box` (top, left, height, width) of a uint8 image [3, H, W], resized to uint8 [1, 3, size, size]."""
    top, left, h, w = box
    # torch's uint8 antialiased kernel is fastest on contiguous channels-last input (0.4 vs 0.6 ms at 224 px).
    crop = image[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _to_unit_float(pixels: Tensor) -> Tensor:
    """uint8 images [..., 3, H, W] (any layout) -> contiguous float32 in [0, 1]."""
    # Planar from here on: on the channels-last layout every later per-channel operation is strided (3-4x slower).
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


def finish_views(views: DeferredView, device: torch.device | str, mean: Sequence[float],
                 std: Sequence[float]) -> Tensor:
    """A batch of deferred views (pixels [B, 3, S, S] uint8, operations [B, K] on the CPU) finished on `device`:
    float in [0, 1], the drawn operations applied, normalised: what the views would have been in the workers."""
    images = _to_unit_float(views.pixels.to(device, non_blocking=True))
    if views.operations.shape[-1]:
        images = apply_ssl_operations(images, views.operations)
    return _Normalize(mean, std)(images)


class TensorClipView:
    """`transforms.clip_view` on a uint8 tensor [3, H, W]: random resized crop, normalise.

    `deferred=True` returns the uint8 crop as a `DeferredView`, to be finished on the training device.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.5, 1.0), deferred: bool = False) -> None:
        self.image_size, self.scale, self.deferred = image_size, tuple(scale), deferred
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        """The recipe's parameters."""
        return f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, deferred={self.deferred})"

    def __call__(self, image: Tensor) -> Tensor | DeferredView:
        """One view: float32 [3, image_size, image_size], normalised (or deferred)."""
        box = sample_crop(image.shape[1], image.shape[2], self.scale)
        pixels = _resized_crop(image, box, self.image_size)[0]
        if self.deferred:
            return DeferredView(pixels, torch.empty(0))
        return self.normalize(_to_unit_float(pixels))


class TensorSSLView:
    """`transforms.ssl_view` on a uint8 tensor [3, H, W]: crop, jitter, grayscale, blur, flip, normalise.

    `deferred=True` returns the uint8 crop and its drawn operations as a `DeferredView`.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_sigma: Sequence[float] = (0.1, 2.0),
                 blur_p: float = 0.5, hflip_p: float = 0.5, deferred: bool = False) -> None:
        self.image_size, self.scale, self.jitter = image_size, tuple(scale), tuple(jitter)
        self.jitter_p, self.grayscale_p, self.blur_p, self.hflip_p = jitter_p, grayscale_p, blur_p, hflip_p
        self.blur_sigma, self.deferred = tuple(blur_sigma), deferred
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        """The recipe's parameters."""
        return (f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, jitter={self.jitter}, "
                f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur_sigma={self.blur_sigma}, "
                f"blur_p={self.blur_p}, hflip_p={self.hflip_p}, deferred={self.deferred})")

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], Tensor]:
        """The random draws of one view of a height x width image, in torchvision's v2 order: the crop box and
        the operations row ([SSL_OPERATIONS] float32: jitter steps and factors, grayscale, blur sigma, flip)."""
        box = sample_crop(height, width, self.scale)
        steps = sample_jitter(*self.jitter) if torch.rand(1).item() < self.jitter_p else []
        padding = [(-1, 0.0)] * (JITTER_STEPS - len(steps))
        row = [float(op) for op, _ in steps + padding] + [factor for _, factor in steps + padding]
        row.append(1.0 if torch.rand(1).item() < self.grayscale_p else 0.0)
        row.append(torch.empty(()).uniform_(*self.blur_sigma).item() if torch.rand(1).item() < self.blur_p else 0.0)
        row.append(1.0 if torch.rand(1).item() < self.hflip_p else 0.0)
        return box, torch.tensor(row, dtype=torch.float32)

    def __call__(self, image: Tensor) -> Tensor | DeferredView:
        """One view: float32 [3, image_size, image_size], normalised (or deferred)."""
        box, operations = self.draw(image.shape[1], image.shape[2])
        pixels = _resized_crop(image, box, self.image_size)
        if self.deferred:
            return DeferredView(pixels[0], operations)
        return self.normalize(apply_ssl_operations(_to_unit_float(pixels), operations[None])[0])
