"""The embedded default dataset: coloured shapes with compositional captions, generated on the fly.

Nothing is downloaded or stored: every image is a pure function of (stream, seed, index), so any index can
be produced in any order, in any process. A 64 px image takes about half a millisecond.

Training pairs (`SyntheticShapes`): a gray, softly textured background with one object (a quarter of the
images) or two objects (the rest). An object is one of 6 colours x 4 shapes x 2 sizes, with jittered
colour, size, position and rotation; the pixels get a little noise. Two objects are separated along one
axis, and the captions say how they relate: "a small red circle above a large blue square", and its
paraphrase "a large blue square below a small red circle". The loader samples one caption per step.

Held-out task (`SyntheticClassification`): zero-shot classification of single-object images into the
24 colour-shape classes ("red circle"), with a classifier built from text alone (class names in
`templates`). Classes are balanced, so chance is 1/24 (4.2 %); a model that knew only the colours would
get about 25 %, so accuracy well above that shows the shape words were learned too. The images come from
their own random stream, disjoint from every `SyntheticShapes` split. Three quarters of the training
images show two objects, so the model has to learn from compositional captions which words belong to
which object, not just memorise single-object pictures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from slip.data.sources.base import check_index

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "ShapeObject",
    "SyntheticClassification",
    "SyntheticShapes",
    "photo_like",
    "render",
]

COLORS = MappingProxyType({
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 45),
    "purple": (150, 55, 195),
    "cyan": (40, 205, 215),
})
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
SPLITS = ("train", "val", "test")

# Independent random streams: each split of SyntheticShapes, and the classification images.
_STREAMS = MappingProxyType({"train": 0, "val": 1, "test": 2, "classification": 3})
_SINGLE_OBJECT_P = 0.25
# Object radius as a fraction of the image side, per size word.
_RADIUS = MappingProxyType({"small": (0.10, 0.13), "large": (0.17, 0.22)})
_COLOR_JITTER = 18  # per channel, uniform in [-j, j]
_PIXEL_NOISE = 8  # per pixel and channel, uniform in [-n, n]
_BACKGROUND_LEVEL = (60, 180)  # gray level of the background, before tint and texture
_MARGIN = 0.03  # free border, as a fraction of the image side
_GAP = 0.05  # least free space between two objects along their axis
_MIN_IMAGE_SIZE = 16
_RELATIONS = MappingProxyType({  # axis-forward relation, its inverse
    "vertical": ("above", "below"),
    "horizontal": ("to the left of", "to the right of"),
})
_INVERSE = MappingProxyType({
    **{forward: inverse for forward, inverse in _RELATIONS.values()},
    **{inverse: forward for forward, inverse in _RELATIONS.values()},
})


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its words, its exact fill colour, and where it is (pixels, y down)."""

    color: str
    shape: str
    size: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    angle: float

    @property
    def phrase(self) -> str:
        """Noun phrase naming the object, e.g. "a small red circle"."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What one image shows: objects, how the first relates to the second, and the background recipe."""

    objects: tuple[ShapeObject, ...]
    relation: str | None
    background: tuple[int, int, int]
    texture_seed: int

    def captions(self) -> list[str]:
        """Equivalent descriptions of the scene (paraphrases)."""
        if len(self.objects) == 1:
            phrase = self.objects[0].phrase
            return [phrase, phrase.replace("a ", "a single ", 1)]
        first, second = self.objects
        return [
            f"{first.phrase} {self.relation} {second.phrase}",
            f"{second.phrase} {_INVERSE[self.relation]} {first.phrase}",
        ]


def _check_int(name: str, value: int, low: int) -> int:
    """An int >= low."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _unit_outline(shape: str) -> np.ndarray | None:
    """Polygon vertices (x, y) of a shape of radius 1 centred at 0; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "triangle":
        r = 1.15  # circumradius, so that its area is not much below the others'
        return np.array([(r * math.cos(a), r * math.sin(a)) for a in np.deg2rad([-90, 30, 150])])
    if shape == "cross":
        w = 0.33
        return np.array([
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ])
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


_OUTLINES = MappingProxyType({shape: _unit_outline(shape) for shape in SHAPES})


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    """Fill one object onto the canvas."""
    cx, cy = obj.center
    outline = _OUTLINES[obj.shape]
    if outline is None:
        r = obj.radius
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
        return
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    rotation = np.array([[cos, sin], [-sin, cos]])
    points = outline @ rotation * obj.radius + (cx, cy)
    draw.polygon([tuple(p) for p in points.tolist()], fill=obj.rgb)


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels (a pure function of its inputs)."""
    rng = np.random.default_rng(scene.texture_seed)
    # Low-frequency texture: a 4x4 grid of brightness offsets, bilinearly stretched over the image.
    offsets = rng.integers(-25, 26, size=(4, 4, 1), dtype=np.int16)
    grid = (np.asarray(scene.background, dtype=np.int16) + offsets).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(grid).resize((image_size, image_size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(
        -_PIXEL_NOISE, _PIXEL_NOISE + 1, size=(image_size, image_size, 3), dtype=np.int16
    )
    # In-place bounds instead of np.clip, whose Python-level wrapper dominates at this image size.
    np.maximum(pixels, 0, out=pixels)
    np.minimum(pixels, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


def _random_object(
    rng: np.random.Generator, image_size: int, color: str, shape: str, size: str
) -> ShapeObject:
    """An object with jittered colour, radius and rotation; its centre is set later."""
    low, high = _RADIUS[size]
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3).tolist()
    return ShapeObject(
        color=color,
        shape=shape,
        size=size,
        rgb=tuple(min(max(c + j, 0), 255) for c, j in zip(COLORS[color], jitter)),
        center=(0.0, 0.0),
        radius=float(rng.uniform(low, high) * image_size),
        angle=float(rng.uniform(-math.pi / 12, math.pi / 12)),
    )


def _random_attributes(rng: np.random.Generator) -> tuple[str, str, str]:
    """A uniformly drawn (colour, shape, size)."""
    color, shape, size = rng.integers((len(COLORS), len(SHAPES), len(SIZES)))
    return tuple(COLORS)[color], SHAPES[shape], SIZES[size]


def _place_single(rng: np.random.Generator, image_size: int, obj: ShapeObject) -> ShapeObject:
    """Put the object anywhere it fits inside the margin."""
    low, high = _MARGIN * image_size + obj.radius, (1 - _MARGIN) * image_size - obj.radius
    x, y = rng.uniform(low, high, size=2)
    return _with_center(obj, float(x), float(y))


def _with_center(obj: ShapeObject, x: float, y: float) -> ShapeObject:
    """A copy of `obj` centred at (x, y)."""
    return replace(obj, center=(x, y))


def _place_pair(
    rng: np.random.Generator, image_size: int, first: ShapeObject, second: ShapeObject, axis: str
) -> tuple[ShapeObject, ShapeObject]:
    """Put `first` before `second` along `axis` (above, or to the left), without overlap.

    Across the axis the two centres differ by at most their distance along it, so the relation is clear.
    """
    margin, gap = _MARGIN * image_size, _GAP * image_size
    r1, r2 = first.radius, second.radius
    slack = max(image_size - 2 * margin - 2 * r1 - 2 * r2 - gap, 0.0)
    u, v = np.sort(rng.uniform(0, slack, size=2))
    along1 = margin + r1 + u
    along2 = along1 + r1 + gap + r2 + (v - u)
    across1 = rng.uniform(margin + r1, image_size - margin - r1)
    reach = along2 - along1
    low = max(margin + r2, across1 - reach)
    high = min(image_size - margin - r2, across1 + reach)
    across2 = rng.uniform(low, high)
    if axis == "vertical":
        return _with_center(first, across1, along1), _with_center(second, across2, along2)
    return _with_center(first, along1, across1), _with_center(second, along2, across2)


def _stream_rng(stream: str, seed: int, index: int) -> np.random.Generator:
    """The generator of one sample: depends only on its stream, seed and index."""
    return np.random.default_rng((_STREAMS[stream], seed, index))


def _texture_seed(rng: np.random.Generator) -> int:
    """A seed for the background texture and pixel noise."""
    return int(rng.integers(2**63))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A gray level with a slight tint."""
    level = rng.integers(*_BACKGROUND_LEVEL)
    return tuple(int(level + t) for t in rng.integers(-10, 11, size=3))


class _GeneratedSamples:
    """What the synthetic datasets share: a checked size, image side and seed, a length and a repr of them."""

    def __init__(self, num_samples: int, image_size: int, seed: int) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.image_size = _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
        self.seed = _check_int("seed", seed, 0)

    def _settings(self) -> dict[str, object]:
        return {"num_samples": self.num_samples, "image_size": self.image_size, "seed": self.seed}

    def __len__(self) -> int:
        """Number of samples."""
        return self.num_samples

    def __repr__(self) -> str:
        """The settings that define the samples."""
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in self._settings().items())})"


class SyntheticShapes(_GeneratedSamples):
    """Image-caption pairs of one or two coloured shapes; `load(i)` gives (image, its captions)."""

    def __init__(
        self, split: str = "train", num_samples: int = 20000, image_size: int = 64, seed: int = 0
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        super().__init__(num_samples, image_size, seed)

    def _settings(self) -> dict[str, object]:
        return {"split": self.split, **super()._settings()}

    def scene(self, index: int) -> Scene:
        """The scene description of sample `index` (what `load` draws and captions)."""
        index = check_index(index, self.num_samples, self)
        rng = _stream_rng(self.split, self.seed, index)
        size = self.image_size
        background, texture_seed = _background(rng), _texture_seed(rng)
        first = _random_object(rng, size, *_random_attributes(rng))
        if rng.random() < _SINGLE_OBJECT_P:
            return Scene((_place_single(rng, size, first),), None, background, texture_seed)
        second = _random_object(rng, size, *_random_attributes(rng))
        axis = ("vertical", "horizontal")[rng.integers(2)]
        placed = _place_pair(rng, size, first, second, axis)
        forward, inverse = _RELATIONS[axis]
        if rng.random() < 0.5:  # name the pair in either order
            return Scene(placed, forward, background, texture_seed)
        return Scene(placed[::-1], inverse, background, texture_seed)

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """RGB image of sample `index` and its equivalent captions."""
        scene = self.scene(index)
        return render(scene, self.image_size), scene.captions()


class SyntheticClassification(_GeneratedSamples):
    """Held-out zero-shot task: single-object images labelled with their colour-shape class."""

    def __init__(self, num_samples: int = 1000, image_size: int = 64, seed: int = 1) -> None:
        super().__init__(num_samples, image_size, seed)
        self.classes: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
        self.templates: list[str] = [
            "a {}.",
            "a photo of a {}.",
            "a drawing of a {}.",
            "a small {}.",
            "a large {}.",
            "a single {}.",
        ]

    def scene(self, index: int) -> Scene:
        """The scene of sample `index`: one object of class `index % len(classes)`, random size and place."""
        index = check_index(index, self.num_samples, self)
        rng = _stream_rng("classification", self.seed, index)
        color, shape = self.classes[index % len(self.classes)].split(" ")
        size = SIZES[rng.integers(len(SIZES))]
        background, texture_seed = _background(rng), _texture_seed(rng)
        obj = _place_single(rng, self.image_size, _random_object(rng, self.image_size, color, shape, size))
        return Scene((obj,), None, background, texture_seed)

    def label(self, index: int) -> int:
        """Class index of sample `index` (without drawing it)."""
        return check_index(index, self.num_samples, self) % len(self.classes)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """RGB image and class index of sample `index`."""
        return render(self.scene(index), self.image_size), self.label(index)


def photo_like(width: int = 640, height: int = 430, seed: int = 0) -> Image.Image:
    """An RGB image with a photo's pixel statistics: colour gradients, filled ellipses, a soft blur, sensor noise.

    For benchmarks and tests of image pipelines (JPEG size, resampling, colour operations); shapes, blur and
    noise scale with the image, so a 640x430 image looks like a small web photo.
    """
    rng = np.random.default_rng(seed)
    unit = max(width, height) / 640
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([120 + 100 * np.sin(3 * x + rng.uniform(0, 6)), 110 + 90 * np.cos(2 * y + rng.uniform(0, 6)),
                     100 + 80 * np.sin(2 * (x + y))], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        low, high = round(20 * unit), max(round(200 * unit), round(20 * unit) + 1)
        draw.ellipse((x0, y0, x0 + int(rng.integers(low, high)), y0 + int(rng.integers(low, high))),
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2 * unit))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
