"""View recipes of the SLIP paper and `MultiView`, which turns one (image, caption) pair into the batch views.

- `clip_view`: the image seen by the image-text objective: a mild random resized crop, nothing else.
- `ssl_view`: SimCLR's recipe as SLIP uses it: crop, colour jitter, grayscale, Gaussian blur, flip.
- `eval_view`: resize the shorter side, centre crop.
- Global crops (`aug1` ... `augN`: the SSL views and, for multi-crop objectives such as DINO, more of them): the
  SSL recipe at the global size and crop scale (`build_multiview`'s `global_crops`, `ssl_crop_size`,
  `ssl_crop_scale`).
- Local crops (`local1` ... `localM`, multi-crop objectives such as DINO): the SSL recipe at their own, smaller
  size and crop scale (`build_multiview`'s `local_crops`, `local_crop_size`, `local_crop_scale`).

Resizing is bilinear everywhere, as in SLIP's training and evaluation code (CLIP's own preprocessing is
bicubic; the difference is immaterial for training and bilinear is the cheaper kernel on uint8 tensors).
All randomness comes from torch's global generator, so `torch.manual_seed` (and DataLoader worker seeding)
makes every view reproducible. The recipes here are torchvision `v2` pipelines over PIL images (the "pil"
backend, the plain reference); `slip.data.tensor_views` computes the same recipes, draw for draw, on tensors
(the "tensor" backend, about 2x faster per core, and the default). The "device" backend draws the same views
in the workers but ships uint8 crops with their drawn operations, and `MultiView.to_device` finishes them,
a batch at a time, on the training device.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image, ImageFilter
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from slip import tokenizer
from slip.checks import positive_int
from slip.data import tensor_views
from slip.data.loader import batch_to_device
from slip.inputs import (ALL_INPUTS, global_views, is_global_view, is_input, is_local_view, local_views,
                         ordered_inputs)
from slip.models.spec import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "BACKENDS",
    "MultiView",
    "RandomGaussianBlur",
    "build_multiview",
    "clip_view",
    "eval_view",
    "ssl_view",
]

CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # defined with the model spec's Preprocess
BACKENDS = ("tensor", "pil", "device")

View = Callable[[Image.Image], Tensor]


def _check_probability(name: str, value: float) -> float:
    """A probability in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """An ordered pair (a, b) with low < a <= b <= high."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers, got {value!r}") from None
    if not low < a <= b <= high:
        raise ValueError(f"{name} must satisfy {low} < {name}[0] <= {name}[1] <= {high}, got {value!r}")
    return a, b


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel RGB mean and (positive) standard deviation."""
    try:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of 3 numbers, got {mean!r} and {std!r}") from None
    if len(mean_t) != 3 or not all(math.isfinite(m) for m in mean_t):
        raise ValueError(f"mean must be 3 finite numbers (RGB), got {mean!r}")
    if len(std_t) != 3 or not all(math.isfinite(s) and s > 0 for s in std_t):
        raise ValueError(f"std must be 3 finite numbers > 0 (RGB), got {std!r}")
    return mean_t, std_t


def _random_resized_crop(image_size: int, scale: tuple[float, float]) -> nn.Module:
    """Crop a random area fraction in `scale` (aspect ratio 3/4 to 4/3) and resize it to a square."""
    return v2.RandomResizedCrop(
        image_size, scale=scale, interpolation=v2.InterpolationMode.BILINEAR, antialias=True
    )


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    """The common tail of every view: uint8 image -> float in [0, 1] -> normalised plain tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


class RandomGaussianBlur(nn.Module):
    """Gaussian blur whose standard deviation is drawn uniformly from `sigma` (in pixels) at every call.

    PIL images use PIL's blur (as SLIP and MoCo v2 do; its radius is the standard deviation), which is
    about 3x faster than a convolution; tensors use a kernel truncated at 3 standard deviations.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.sigma = _check_range("blur_sigma", sigma, 0.0, math.inf)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"sigma={self.sigma}"

    def forward(self, image: Image.Image | Tensor) -> Image.Image | Tensor:
        """Blur `image` with a freshly drawn sigma."""
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        kernel = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def clip_view(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: Sequence[float] = (0.5, 1.0)
) -> v2.Compose:
    """Image-text view: random resized crop (bilinear) to `image_size`, to tensor, normalise; no flip."""
    positive_int("image_size", image_size)
    mean, std = _check_stats(mean, std)
    scale = _check_range("scale", scale, 0.0, 1.0)
    return v2.Compose([_random_resized_crop(image_size, scale), *_to_normalized_tensor(mean, std)])


def ssl_view(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    blur_p: float = 0.5,
    hflip_p: float = 0.5,
) -> v2.Compose:
    """SimCLR view: crop, colour jitter (brightness, contrast, saturation, hue), grayscale, blur, flip."""
    positive_int("image_size", image_size)
    mean, std = _check_stats(mean, std)
    scale = _check_range("scale", scale, 0.0, 1.0)
    try:
        brightness, contrast, saturation, hue = (float(j) for j in jitter)
    except (TypeError, ValueError):
        raise ValueError(
            f"jitter must be 4 numbers (brightness, contrast, saturation, hue), got {jitter!r}"
        ) from None
    if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
        raise ValueError(f"jitter must be >= 0 with hue <= 0.5, got {jitter!r}")
    jitter_p = _check_probability("jitter_p", jitter_p)
    return v2.Compose([
        _random_resized_crop(image_size, scale),
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p),
        v2.RandomGrayscale(p=_check_probability("grayscale_p", grayscale_p)),
        v2.RandomApply([RandomGaussianBlur(blur_sigma)], p=_check_probability("blur_p", blur_p)),
        v2.RandomHorizontalFlip(p=_check_probability("hflip_p", hflip_p)),
        *_to_normalized_tensor(mean, std),
    ])


def eval_view(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Evaluation view: resize the shorter side to `image_size` (bilinear), centre crop, normalise."""
    positive_int("image_size", image_size)
    mean, std = _check_stats(mean, std)
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(image_size),
        *_to_normalized_tensor(mean, std),
    ])


def _tokenize_one(caption: str, context_length: int) -> Tensor:
    """Token ids of one caption as a 1-D LongTensor [context_length]."""
    return tokenizer.tokenize(caption, context_length)[0]


class MultiView:
    """Maps (PIL image, caption) to a dict with one tensor per named image view, plus "text" token ids.

    `prepare` turns the decoded image into what the views take, once per sample (default: the RGB PIL image).
    Views may return `tensor_views.DeferredView`s; `to_device` then finishes them with `finish`.
    """

    def __init__(self, views: Mapping[str, View], tokenize: Callable[[str], Tensor] | None = None,
                 prepare: Callable[[Image.Image], object] | None = None,
                 finish: Callable[[tensor_views.DeferredView, torch.device | str], Tensor] | None = None) -> None:
        if not views and tokenize is None:
            raise ValueError("MultiView needs at least one view or a tokenize function, got neither")
        if "text" in views:
            raise ValueError("views must not be named 'text': that key holds the caption's token ids")
        self.views = dict(views)
        self.tokenize = tokenize
        self.prepare = prepare
        self.finish = finish

    @property
    def keys(self) -> tuple[str, ...]:
        """Names of the entries `__call__` returns, in order."""
        return tuple(self.views) + (("text",) if self.tokenize is not None else ())

    def __repr__(self) -> str:
        """Names of the views and whether captions are tokenized."""
        return f"{type(self).__name__}(views={list(self.views)}, tokenize={self.tokenize is not None})"

    def to_device(self, batch: Mapping[str, object], device: torch.device | str) -> dict[str, object]:
        """A collated batch on `device`, its deferred views finished there (the training loop's batch step)."""
        moved = batch_to_device(batch, device)
        for key, value in moved.items():
            if isinstance(value, tensor_views.DeferredView):
                if self.finish is None:
                    raise ValueError(f"batch[{key!r}] is a deferred view, but this MultiView has no finish function")
                moved[key] = self.finish(value, device)
        return moved

    def __call__(self, image: Image.Image, caption: str) -> dict[str, Tensor]:
        """Every view of `image` (each with its own random draws) and, if tokenizing, the caption's ids."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        prepared = image if self.prepare is None or not self.views else self.prepare(image)
        sample = {name: view(prepared) for name, view in self.views.items()}
        if self.tokenize is not None:
            sample["text"] = self.tokenize(caption)
        return sample


def build_multiview(
    inputs: Sequence[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    context_length: int = 77,
    clip_scale: Sequence[float] = (0.5, 1.0),
    ssl_crop_scale: Sequence[float] = (0.08, 1.0),
    jitter_strength: float = 1.0,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    blur_p: float = 0.5,
    hflip_p: float = 0.5,
    backend: str = "tensor",
    local_crops: int = 0,
    local_crop_size: int = 96,
    local_crop_scale: Sequence[float] = (0.05, 0.4),
    global_crops: int = 2,
    ssl_crop_size: int | None = None,
) -> MultiView:
    """The `MultiView` producing exactly `inputs` (a subset of image, text, the global views aug1 ...
    aug{`global_crops`} and the local views local1 ... local{`local_crops`}; `objective.inputs`).

    "image" gets `clip_view`, "text" the tokenizer, each global view ("aug1", "aug2": the SSL views, and for
    multi-crop objectives "aug3" ...) an independent `ssl_view` of `ssl_crop_size` px (None: `image_size`) whose crop
    covers `ssl_crop_scale` of the image, and each local view an independent `ssl_view` of `local_crop_size` px whose
    crop covers `local_crop_scale` of the image (DINO's local crops); views are built only where `inputs` name them.
    `jitter_strength` s scales the colour jitter to (0.4 s, 0.4 s, 0.4 s, 0.1 s). `backend` "tensor" computes the
    views with `slip.data.tensor_views`, "pil" with torchvision's PIL pipelines (same draws), "device" crops and
    draws in the workers and finishes the views on the training device (`MultiView.to_device`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if isinstance(inputs, str):
        raise ValueError(f"inputs must be a sequence of names such as ('image', 'text'), got {inputs!r}")
    requested = list(inputs)
    unknown = [name for name in requested if not is_input(name)]
    if unknown or not requested:
        raise ValueError(f"inputs must be a non-empty subset of {list(ALL_INPUTS)}, global views aug3, aug4, ... and "
                         f"local views local1, local2, ..., got {list(inputs)}")
    if isinstance(global_crops, bool) or not isinstance(global_crops, int) or global_crops < 2:
        raise ValueError(f"global_crops must be an integer >= 2 (aug1 and aug2 are global views), got {global_crops!r}")
    if isinstance(local_crops, bool) or not isinstance(local_crops, int) or local_crops < 0:
        raise ValueError(f"local_crops must be an integer >= 0, got {local_crops!r}")
    for kind, key, count, recognise, named in (("global", "global_crops", global_crops, is_global_view, global_views),
                                                ("local", "local_crops", local_crops, is_local_view, local_views)):
        beyond = [name for name in requested if recognise(name) and name not in named(count)]
        if beyond:
            raise ValueError(f"inputs name {kind} view {beyond[0]!r} but augment.{key}={count} builds "
                             f"{list(named(count)) or 'none'}")
    if isinstance(jitter_strength, bool) or not isinstance(jitter_strength, (int, float)) or not (
        0 <= jitter_strength <= 5
    ):
        raise ValueError(f"jitter_strength must be in [0, 5] (so that hue <= 0.5), got {jitter_strength!r}")
    # Checked here under their own names, and even when no view uses them, so a bad config fails at once.
    positive_int("image_size", image_size)
    _check_stats(mean, std)
    positive_int("context_length", context_length)
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")
    clip_scale = _check_range("clip_scale", clip_scale, 0.0, 1.0)
    ssl_crop_scale = _check_range("ssl_crop_scale", ssl_crop_scale, 0.0, 1.0)
    global_size = image_size if ssl_crop_size is None else positive_int("ssl_crop_size", ssl_crop_size)
    positive_int("local_crop_size", local_crop_size)
    local_crop_scale = _check_range("local_crop_scale", local_crop_scale, 0.0, 1.0)
    for name, value in [("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                        ("hflip_p", hflip_p)]:
        _check_probability(name, value)
    _check_range("blur_sigma", blur_sigma, 0.0, math.inf)
    names = ordered_inputs(requested)
    on_tensors = backend != "pil"
    # Deferred views are finished by MultiView.to_device; only the "device" backend defers.
    deferred = {"deferred": True} if backend == "device" else {}
    views: dict[str, View] = {}
    for name in names:
        if name == "image":
            make_clip = tensor_views.TensorClipView if on_tensors else clip_view
            views[name] = make_clip(image_size, mean, std, scale=clip_scale, **deferred)
        elif is_global_view(name) or is_local_view(name):
            size, scale = (global_size, ssl_crop_scale) if is_global_view(name) else (local_crop_size, local_crop_scale)
            s = float(jitter_strength)
            make_ssl = tensor_views.TensorSSLView if on_tensors else ssl_view
            views[name] = make_ssl(
                size, mean, std, scale=scale, jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s),
                jitter_p=jitter_p, grayscale_p=grayscale_p, blur_sigma=blur_sigma, blur_p=blur_p,
                hflip_p=hflip_p, **deferred,
            )
    text = None
    if "text" in names:
        # A partial of a module-level function (not a lambda) so that DataLoader workers can pickle it.
        text = functools.partial(_tokenize_one, context_length=context_length)
    finish = functools.partial(tensor_views.finish_views, mean=mean, std=std) if deferred else None
    return MultiView(views, text, tensor_views.image_to_tensor if on_tensors else None, finish)
