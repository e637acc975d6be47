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
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "TensorClipView",
    "TensorSSLView",
    "adjust_hue",
    "color_jitter",
    "gaussian_blur",
    "image_to_tensor",
    "sample_crop",
    "sample_jitter",
]

ASPECT_RATIO = (3 / 4, 4 / 3)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (and so its contrast and saturation)


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
    """Luma [1, H, W] of a float RGB image [3, H, W]."""
    r, g, b = image.unbind(0)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(0)


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the HSV hue of a float RGB image in [0, 1] by `shift` turns (torchvision's adjust_hue)."""
    return _adjust_hue_(image.clone(), shift)


def _adjust_hue_(image: Tensor, shift: float) -> Tensor:
    """`adjust_hue` in place on a contiguous image.

    A hue rotation keeps each pixel's max and min channel, so with t_c = clamp(|h - centre_c| - 1, 0, 1)
    (h the rotated hue in sixths of a turn, centres 3, 2, 4 for R, G, B), R = min + chroma * t_R and
    G, B = max - chroma * t_G, t_B: the piecewise-linear colour wheel, one plane at a time.
    """
    r, g, b = image.unbind(0)
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
    hue.div_(chroma.clamp_min(1e-12)).add_(6.0 * shift)  # chroma 0: the hue is unused
    hue.sub_(torch.floor(hue * (1.0 / 6.0)).mul_(6.0))  # into [0, 6); 3x faster than remainder_
    for plane, centre in zip(image, (3.0, 2.0, 4.0)):
        torch.sub(hue, centre, out=plane).abs_().sub_(1.0).clamp_(0.0, 1.0)
    torch.addcmul(low, chroma, image[0], out=image[0])
    torch.addcmul(high, chroma, image[1], value=-1.0, out=image[1])
    torch.addcmul(high, chroma, image[2], value=-1.0, out=image[2])
    return image


def color_jitter(image: Tensor, operations: Sequence[tuple[int, float]]) -> Tensor:
    """Apply `sample_jitter`'s operations to a float RGB image in [0, 1], clamping after each as torchvision does."""
    return _color_jitter_(image.clone(), operations)


def _color_jitter_(image: Tensor, operations: Sequence[tuple[int, float]]) -> Tensor:
    """`color_jitter` in place on a contiguous image."""
    for op, factor in operations:
        if op == 0:
            image.mul_(factor).clamp_(0.0, 1.0)
        elif op == 1:
            # The mean of the luma is the luma of the channel means (one pass over the image).
            mean = sum(w * m for w, m in zip(GRAY_WEIGHTS, image.mean(dim=(1, 2)).tolist()))
            image.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, 1.0)
        elif op == 2:
            gray = _gray(image)
            image.mul_(factor).add_(gray, alpha=1.0 - factor).clamp_(0.0, 1.0)
        else:
            _adjust_hue_(image, factor)
    return image


def gaussian_kernel(sigma: float, radius: int | None = None) -> Tensor:
    """Normalised 1-D Gaussian weights over 2 * radius + 1 taps (default radius: ceil(3 sigma))."""
    radius = math.ceil(3 * sigma) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a float image [C, H, W] with reflected borders (torchvision's gaussian_blur).

    The kernel reaches 3 standard deviations, or one pixel less than the image's shorter side on tiny images
    (reflection needs that).
    """
    radius = min(math.ceil(3 * sigma), min(image.shape[1:]) - 1)
    weights = gaussian_kernel(sigma, radius).tolist()
    for dim in (2, 1):  # along the width, then the height
        size = image.shape[dim]
        pad = (radius, radius, 0, 0) if dim == 2 else (0, 0, radius, radius)
        padded = F.pad(image.unsqueeze(0), pad, mode="reflect").squeeze(0)
        out = padded.narrow(dim, 0, size) * weights[0]
        for tap in range(1, len(weights)):
            out.add_(padded.narrow(dim, tap, size), alpha=weights[tap])
        image = out
    return image


class _Normalize:
    """Float in [0, 1] -> (x - mean) / std, in place, one channel plane at a time (faster than broadcasting)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = [1.0 / s for s in std]
        self.shift = [-m / s for m, s in zip(mean, std)]

    def __call__(self, image: Tensor) -> Tensor:
        image = image.contiguous() if image.stride(0) else image.clone()  # grayscale views share one plane
        for plane, scale, shift in zip(image, self.scale, self.shift):
            plane.mul_(scale).add_(shift)
        return image


def _crop_to_float(image: Tensor, size: int, scale: Sequence[float]) -> Tensor:
    """Random resized crop of a uint8 image [3, H, W] to a contiguous float [3, size, size] in [0, 1]."""
    top, left, h, w = sample_crop(image.shape[1], image.shape[2], scale)
    # torch's uint8 antialiased kernel is fastest on contiguous channels-last input (0.4 vs 0.6 ms at 224 px).
    crop = image[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # Planar from here on: on the channels-last layout every later per-channel operation is strided (3-4x slower).
    return resized[0].to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


class TensorClipView:
    """`transforms.clip_view` on a uint8 tensor [3, H, W]: random resized crop, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.5, 1.0)) -> None:
        self.image_size, self.scale = image_size, tuple(scale)
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        """The recipe's parameters."""
        return f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale})"

    def __call__(self, image: Tensor) -> Tensor:
        """One view: float32 [3, image_size, image_size], normalised."""
        return self.normalize(_crop_to_float(image, self.image_size, self.scale))


class TensorSSLView:
    """`transforms.ssl_view` on a uint8 tensor [3, H, W]: crop, jitter, grayscale, blur, flip, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_sigma: Sequence[float] = (0.1, 2.0),
                 blur_p: float = 0.5, hflip_p: float = 0.5) -> None:
        self.image_size, self.scale, self.jitter = image_size, tuple(scale), tuple(jitter)
        self.jitter_p, self.grayscale_p, self.blur_p, self.hflip_p = jitter_p, grayscale_p, blur_p, hflip_p
        self.blur_sigma = tuple(blur_sigma)
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        """The recipe's parameters."""
        return (f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, jitter={self.jitter}, "
                f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, blur_sigma={self.blur_sigma}, "
                f"blur_p={self.blur_p}, hflip_p={self.hflip_p})")

    def __call__(self, image: Tensor) -> Tensor:
        """One view: float32 [3, image_size, image_size], normalised. Draws as torchvision's v2 pipeline does."""
        view = _crop_to_float(image, self.image_size, self.scale)
        if torch.rand(1).item() < self.jitter_p:
            view = _color_jitter_(view, sample_jitter(*self.jitter))
        if torch.rand(1).item() < self.grayscale_p:
            view = _gray(view).expand(3, -1, -1)
        if torch.rand(1).item() < self.blur_p:
            view = gaussian_blur(view, torch.empty(()).uniform_(*self.blur_sigma).item())
        if torch.rand(1).item() < self.hflip_p:
            view = view.flip(2)
        return self.normalize(view)
