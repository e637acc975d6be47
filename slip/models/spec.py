"""The typed model spec: frozen dataclasses for the image tower, text tower, heads and preprocessing.

A `ModelSpec` says everything needed to build a model (`slip.models.build_model`), validated once on construction.
Checkpoints keep `spec.to_dict()` (plain JSON data); `ModelSpec.from_dict` reads it back, and
`spec_from_legacy_arch` reads the flat `arch` record of earlier versions. Each field also has the builder keyword
that sets it (`vision_width`, `text_layers`, ...): `vit_spec` / `resnet_spec` take those keywords, errors name
them, and `ModelSpec.sizes()` reports by them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

from slip.checks import positive_int
from slip.models.heads import CLIP_INITIAL_LOGIT_SCALE, SSL_HEAD_NORMS
from slip.inputs import ALL_INPUTS, SSL_VIEWS, is_global_view, is_input, is_local_view
from slip.models.vision import ModifiedResNet, check_patch_dropout, vit_tower

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "HeadSpec",
           "ModelSpec", "Preprocess", "ResNetSpec", "TextSpec", "ViTSpec", "VisionSpec", "spec_from_kwargs"]

# Pixel normalisation is part of a model: SLIP trained with ImageNet statistics, OpenAI CLIP with its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The resize filter of slip's image views (slip.data.transforms), recorded for exporters (hf's "resample").
INTERPOLATIONS = ("bilinear",)


def _field(kwarg: str | None, size: bool = True, **options: Any) -> Any:
    """A spec field set by builder keyword `kwarg`; `size`: whether it is an architecture size the weights fix
    (False for training settings and for which optional parts exist)."""
    return field(metadata={"kwarg": kwarg, "size": size}, **options)


def _kwarg(spec: Any, name: str) -> str:
    """The builder keyword of field `name` of `spec`, which errors name."""
    return {f.name: f.metadata.get("kwarg") or f.name for f in dataclasses.fields(spec)}[name]


def _positive_ints(spec: Any, *names: str) -> None:
    for name in names:
        positive_int(_kwarg(spec, name), getattr(spec, name))


def _set(spec: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen spec in `__post_init__` (e.g. a JSON list to a tuple)."""
    object.__setattr__(spec, name, value)


def _builder_kwargs(spec: Any) -> dict[str, Any]:
    """The spec's fields by builder keyword (fields without one left out)."""
    return {f.metadata["kwarg"]: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.metadata.get("kwarg")}




class VisionSpec:
    """The image tower's part of a spec; subclasses say how to build their tower."""

    tag: ClassVar[str]  # names the class in `to_dict` output; read back only through `_VISION_TYPES`
    tower_name: ClassVar[str]  # for messages
    projects_image: ClassVar[bool]  # whether the model adds an image projection after the tower
    takes_smaller_crops: ClassVar[bool]  # whether the tower embeds images of other sizes than its own (multi-crop)

    def build_tower(self, image_size: int, embed_dim: int) -> nn.Module:
        """The image tower for `image_size` px images (`embed_dim`: the joint space, for towers that pool into it)."""
        raise NotImplementedError

    def check_image_size(self, image_size: int) -> None:
        """Raise ValueError where the tower cannot take `image_size` px images."""

    def check_crop_size(self, crop_size: int, image_size: int) -> None:
        """Raise a one-line ValueError naming the tower where it cannot embed `crop_size` px crops beside its
        `image_size` px images."""
        if crop_size != image_size and not self.takes_smaller_crops:
            raise ValueError(f"{crop_size} px crops need an image tower that takes other sizes than its "
                             f"{image_size} px images; the {self.tower_name} tower takes {image_size} px only")

    def view_patch_dropout(self) -> dict[str, float]:
        """The share of patch tokens each image view drops in training (none for towers without patches)."""
        return {}

    def blocks(self, tower: nn.Module) -> list[nn.Module]:
        """The tower's repeated blocks, in depth order: what sharding (FSDP2) makes a unit each."""
        raise NotImplementedError

    def describe(self, image_size: int) -> str:
        """One line for model cards."""
        raise NotImplementedError

    def for_finetuning(self, drop_path_rate: float) -> VisionSpec:
        """This tower as end-to-end fine-tuning builds it: with stochastic depth `drop_path_rate`, every token
        kept; a one-line ValueError where the tower has no stochastic depth to set."""
        if drop_path_rate:
            raise ValueError(f"the {self.tower_name} tower has no drop path; set drop_path_rate to 0")
        return self


@dataclass(frozen=True)
class ViTSpec(VisionSpec):
    """A timm Vision Transformer tower (SLIP's layout, or OpenAI CLIP's with `openai_layout`)."""

    patch_size: int = _field("patch_size")
    width: int = _field("vision_width")
    layers: int = _field("vision_layers")
    heads: int = _field("vision_heads")
    openai_layout: bool = _field("openai_layout", default=False)
    drop_path_rate: float = _field("drop_path_rate", size=False, default=0.0)
    patch_dropout: float = _field("patch_dropout", size=False, default=0.0)
    ssl_patch_dropout: float = _field("ssl_patch_dropout", size=False, default=0.0)

    tag: ClassVar[str] = "vit"
    tower_name: ClassVar[str] = "ViT"
    projects_image: ClassVar[bool] = True
    takes_smaller_crops: ClassVar[bool] = True  # its positional embedding is resampled to the crop's patch grid

    def __post_init__(self) -> None:
        _positive_ints(self, "patch_size", "width", "layers", "heads")
        if self.width % self.heads:
            raise ValueError(f"vision_width={self.width} is not divisible by vision_heads={self.heads}")
        if not isinstance(self.openai_layout, bool):
            raise ValueError(f"openai_layout must be true or false, got {self.openai_layout!r}")
        if isinstance(self.drop_path_rate, bool) or not isinstance(self.drop_path_rate, (int, float)) \
                or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a fraction in [0, 1), got {self.drop_path_rate!r}")
        _set(self, "drop_path_rate", float(self.drop_path_rate))
        for name in ("patch_dropout", "ssl_patch_dropout"):
            _set(self, name, check_patch_dropout(name, getattr(self, name)))

    def check_image_size(self, image_size: int) -> None:
        """Raise ValueError unless `image_size` is a multiple of the patch size."""
        if image_size % self.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={self.patch_size}")

    def check_crop_size(self, crop_size: int, image_size: int) -> None:
        """Raise a one-line ValueError unless `crop_size` is a multiple of the patch size."""
        if crop_size % self.patch_size:
            raise ValueError(f"{crop_size} px crops are not a multiple of the ViT's patch_size={self.patch_size}")

    def build_tower(self, image_size: int, embed_dim: int) -> nn.Module:
        """A timm ViT whose PatchDropout (if any) can take the larger of the two view rates."""
        return vit_tower(image_size=image_size, patch_size=self.patch_size, width=self.width, depth=self.layers,
                         heads=self.heads, openai_layout=self.openai_layout, drop_path_rate=self.drop_path_rate,
                         patch_dropout=max(self.patch_dropout, self.ssl_patch_dropout))

    def for_finetuning(self, drop_path_rate: float) -> ViTSpec:
        """This ViT with stochastic depth `drop_path_rate` (checked as the field is) and no patch dropout."""
        return dataclasses.replace(self, drop_path_rate=drop_path_rate, patch_dropout=0.0, ssl_patch_dropout=0.0)

    def blocks(self, tower: nn.Module) -> list[nn.Module]:
        """The ViT's transformer blocks."""
        return list(tower.blocks)

    def view_patch_dropout(self) -> dict[str, float]:
        """FLIP's patch dropout: `patch_dropout` for the CLIP view, `ssl_patch_dropout` for the SSL views (and the
        further global and the local views, which `ImageTextModel` gives the SSL views' rate)."""
        return {"image": self.patch_dropout, **{view: self.ssl_patch_dropout for view in SSL_VIEWS}}

    def describe(self, image_size: int) -> str:
        """e.g. "ViT (SLIP's timm layout), 224 px, patch 16, width 384, 12 layers, 12 heads"."""
        layout = "OpenAI CLIP layout" if self.openai_layout else "SLIP's timm layout"
        return (f"ViT ({layout}), {image_size} px, patch {self.patch_size}, width {self.width}, "
                f"{self.layers} layers, {self.heads} heads")


@dataclass(frozen=True)
class ResNetSpec(VisionSpec):
    """CLIP's ModifiedResNet tower, whose attention pool projects into the joint space."""

    layers: tuple[int, int, int, int] = _field("vision_layers")
    width: int = _field("vision_width")
    heads: int = _field("vision_heads")
    channels_last: bool = _field("channels_last", size=False, default=True)

    tag: ClassVar[str] = "resnet"
    tower_name: ClassVar[str] = "ModifiedResNet"
    projects_image: ClassVar[bool] = False
    takes_smaller_crops: ClassVar[bool] = False  # its attention pool's positional embedding is for one grid only

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"vision_layers must be 4 positive stage depths, got {layers!r}")
        _set(self, "layers", tuple(layers))
        _positive_ints(self, "width", "heads")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {self.channels_last!r}")

    def check_image_size(self, image_size: int) -> None:
        """Raise ValueError unless `image_size` is a multiple of the tower's stride, 32."""
        if image_size % 32:
            raise ValueError(f"image_size={image_size} is not a multiple of 32, the ModifiedResNet's stride")

    def build_tower(self, image_size: int, embed_dim: int) -> nn.Module:
        """A ModifiedResNet pooling into `embed_dim`."""
        return ModifiedResNet(layers=self.layers, output_dim=embed_dim, heads=self.heads, image_size=image_size,
                              width=self.width, channels_last=self.channels_last)

    def blocks(self, tower: nn.Module) -> list[nn.Module]:
        """The ResNet's four stages."""
        return [tower.layer1, tower.layer2, tower.layer3, tower.layer4]

    def describe(self, image_size: int) -> str:
        """e.g. "ModifiedResNet, stages (3, 4, 6, 3), width 64, 224 px"."""
        return f"ModifiedResNet, stages {self.layers}, width {self.width}, {image_size} px"


@dataclass(frozen=True)
class TextSpec:
    """CLIP's text Transformer (built only where the inputs include "image" or "text")."""

    width: int = _field("text_width")
    layers: int = _field("text_layers")
    heads: int = _field("text_heads")
    context_length: int = _field("context_length")
    vocab_size: int = _field("vocab_size")

    def __post_init__(self) -> None:
        _positive_ints(self, "width", "layers", "heads", "context_length", "vocab_size")
        if self.width % self.heads:
            raise ValueError(f"text_width={self.width} is not divisible by text_heads={self.heads}")


@dataclass(frozen=True)
class HeadSpec:
    """The heads: the joint space's size and initial logit scale, and the SSL MLP head's sizes and norm."""

    embed_dim: int = _field("embed_dim")
    ssl_mlp_dim: int = _field("ssl_mlp_dim", size=False, default=4096)
    ssl_embed_dim: int = _field("ssl_embed_dim", size=False, default=256)
    ssl_head_norm: str = _field("ssl_head_norm", size=False, default="batch")
    logit_scale_init: float = _field("logit_scale_init", size=False, default=CLIP_INITIAL_LOGIT_SCALE)

    def __post_init__(self) -> None:
        _positive_ints(self, "embed_dim", "ssl_mlp_dim", "ssl_embed_dim")
        if self.ssl_head_norm not in SSL_HEAD_NORMS:
            raise ValueError(f"ssl_head_norm must be one of {list(SSL_HEAD_NORMS)}, got {self.ssl_head_norm!r}")
        if isinstance(self.logit_scale_init, bool) or not isinstance(self.logit_scale_init, (int, float)):
            raise ValueError(f"logit_scale_init must be a number, got {self.logit_scale_init!r}")
        _set(self, "logit_scale_init", float(self.logit_scale_init))


@dataclass(frozen=True)
class Preprocess:
    """What the model expects of its images: side in pixels, per-channel mean and std, resize filter."""

    image_size: int = _field("image_size")
    mean: tuple[float, float, float] = _field("image_mean")
    std: tuple[float, float, float] = _field("image_std")
    interpolation: str = _field(None, size=False, default="bilinear")

    def __post_init__(self) -> None:
        _positive_ints(self, "image_size")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3 or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{_kwarg(self, name)} must be 3 numbers, got {value!r}")
            _set(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ValueError(f"image_std must be > 0 in every channel, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")


_VISION_TYPES: Mapping[str, type] = {cls.tag: cls for cls in (ViTSpec, ResNetSpec)}
_PARTS = {"text": TextSpec, "head": HeadSpec, "preprocess": Preprocess}


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: image tower, text tower, heads, preprocessing, and the inputs (which parts are built)."""

    vision: ViTSpec | ResNetSpec
    text: TextSpec
    head: HeadSpec
    preprocess: Preprocess
    inputs: tuple[str, ...] = ALL_INPUTS

    def __post_init__(self) -> None:
        for name, cls in (("vision", VisionSpec), *_PARTS.items()):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"ModelSpec.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        inputs = self.inputs
        if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs or not all(
                is_input(name) for name in inputs):
            raise ValueError(f"model inputs must be a non-empty subset of {list(ALL_INPUTS)}, global views aug3, aug4, "
                             f"... and local views local1, local2, ..., got {inputs!r}")
        _set(self, "inputs", tuple(inputs))
        self.vision.check_image_size(self.preprocess.image_size)
        local = [name for name in self.inputs if is_local_view(name)]
        if local and not self.vision.takes_smaller_crops:
            raise ValueError(f"local views ({', '.join(local)}) need an image tower that takes crops smaller than its "
                             f"{self.preprocess.image_size} px images; the {self.vision.tower_name} tower takes "
                             f"{self.preprocess.image_size} px only")

    @property
    def with_text(self) -> bool:
        """Whether the inputs need the text tower and the projections ("image" or "text")."""
        return "text" in self.inputs or "image" in self.inputs

    @property
    def with_ssl_head(self) -> bool:
        """Whether the inputs need the SSL head (a global view "aug1", "aug2", ... or a local view)."""
        return any(is_global_view(view) or is_local_view(view) for view in self.inputs)

    def builder_kwargs(self) -> dict[str, Any]:
        """Every field by its builder keyword: `vit_spec(**spec.builder_kwargs())` (or resnet_spec) == spec."""
        kwargs = {"inputs": self.inputs}
        for part in (self.vision, self.text, self.head, self.preprocess):
            kwargs.update(_builder_kwargs(part))
        return kwargs

    def sizes(self) -> dict[str, Any]:
        """The architecture sizes the weights fix, by builder keyword (training settings and which optional parts
        exist left out); two specs whose sizes are equal load each other's weights."""
        sizes = {}
        for part in (self.vision, self.text, self.head, self.preprocess):
            sizes.update({f.metadata["kwarg"]: getattr(part, f.name) for f in dataclasses.fields(part)
                          if f.metadata.get("kwarg") and f.metadata["size"]})
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; `ModelSpec.from_dict` reads it back."""
        def plain(part: Any) -> dict[str, Any]:
            return {name: list(value) if isinstance(value, tuple) else value
                    for name, value in dataclasses.asdict(part).items()}

        return {"vision": {"type": self.vision.tag, **plain(self.vision)},
                **{name: plain(getattr(self, name)) for name in _PARTS}, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """The spec `to_dict` wrote; a one-line ValueError naming the part that does not fit."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model spec must be a mapping, got {type(data).__name__}")
        missing = [name for name in ("vision", *_PARTS) if not isinstance(data.get(name), Mapping)]
        if missing:
            raise ValueError(f"model spec: {missing[0]!r} is missing or not a mapping")
        vision = dict(data["vision"])
        tag = vision.pop("type", None)
        if tag not in _VISION_TYPES:
            raise ValueError(f"model spec: vision.type={tag!r} is not one of {sorted(_VISION_TYPES)}")
        parts = {"vision": (_VISION_TYPES[tag], vision),
                 **{name: (part, data[name]) for name, part in _PARTS.items()}}
        built = {}
        for name, (part, values) in parts.items():
            try:
                built[name] = part(**values)
            except TypeError as error:  # unknown or missing field names
                raise ValueError(f"model spec: {name}: {error}") from None
        return cls(**built, inputs=data.get("inputs"))


def _from_kwargs(cls: type, kwargs: Mapping[str, Any]) -> Any:
    """An instance of spec class `cls` from builder keywords (its fields without a keyword keep their defaults)."""
    return cls(**{f.name: kwargs[f.metadata["kwarg"]] for f in dataclasses.fields(cls) if f.metadata.get("kwarg")})


def spec_from_kwargs(vision_type: type, kwargs: Mapping[str, Any]) -> ModelSpec:
    """The spec of builder keywords `kwargs` (every keyword of the family's spec function) for tower `vision_type`."""
    return ModelSpec(vision=_from_kwargs(vision_type, kwargs), text=_from_kwargs(TextSpec, kwargs),
                     head=_from_kwargs(HeadSpec, kwargs), preprocess=_from_kwargs(Preprocess, kwargs),
                     inputs=kwargs["inputs"])
