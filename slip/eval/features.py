"""Frozen image features of a labelled dataset, and an on-disk cache of them keyed by checkpoint and dataset.

`extract_features` runs a model once over a map-style dataset of (PIL image, int label) items with the
evaluation view (resize, centre crop, the model's own normalisation) and returns float32 features and int64
labels on the CPU. Linear probes and kNN read these, so a sweep over their settings never re-runs the model.

`FeatureCache` stores such a pair under a file named by the hash of a key (a JSON-able mapping). The key
names everything the features depend on: the checkpoint's content hash (`checkpoint_fingerprint`), the
dataset's identity, the split, the image size and the feature kind; `feature_key` builds it. The key is
stored inside the file and compared on load, so a renamed or colliding file is never served. Writes are
atomic; an unreadable or inconsistent file is recomputed with a warning.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from slip.checkpoint import atomic_save
from slip.checks import positive_int
from slip.error_text import first_line
from slip.models import ImageTextModel

__all__ = [
    "CACHE_FORMAT",
    "EvalViewDataset",
    "FEATURE_KINDS",
    "REQUIRED_KEY_FIELDS",
    "FeatureCache",
    "check_features",
    "check_targets",
    "checkpoint_fingerprint",
    "dataset_identity",
    "extract_features",
    "feature_key",
    "standardize",
]

FEATURE_KINDS = ("backbone", "embedding")
REQUIRED_KEY_FIELDS = ("checkpoint", "dataset", "split", "image_size", "kind")
# Part of every cache key and file: bump it when extraction changes, so old files stop matching.
CACHE_FORMAT = "slip-features-v1"
_HASH_CHUNK = 1 << 20


def check_features(name: str, x: Tensor, y: Tensor | None = None, num_classes: int | None = None) -> None:
    """Raise ValueError unless `x` is a finite float [N, D] (N >= 1) and `y` int [N] with labels in [0, C)."""
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point() or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} features must be a non-empty float tensor [N, D], got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or infinite values")
    if y is None:
        return
    if not isinstance(y, Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        shape = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name} labels must be an integer tensor [N], got {shape}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} feature rows but {y.shape[0]} labels")
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")


def check_targets(name: str, x: Tensor, targets: Tensor) -> None:
    """Raise ValueError unless `x` is valid features [N, D] and `targets` an integer [N, C] of 1, 0 and -1."""
    check_features(name, x)
    if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.dtype.is_floating_point \
            or targets.dtype == torch.bool:
        shape = (tuple(targets.shape), targets.dtype) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{name} targets must be an integer tensor [N, C], got {shape}")
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} feature rows but {targets.shape[0]} target rows")
    if targets.shape[1] < 1 or not bool(((targets >= -1) & (targets <= 1)).all()):
        raise ValueError(f"{name} targets must be 1 (present), 0 (absent) or -1 (ignored) for each of >= 1 classes")


class EvalViewDataset(torch.utils.data.Dataset):
    """(PIL image, label) items -> (normalised tensor, label) through the evaluation view."""

    def __init__(self, dataset: Any, transform: Callable[[Image.Image], Tensor], num_classes: int | None) -> None:
        self.dataset, self.transform, self.num_classes = dataset, transform, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        image, label = self.dataset[index]
        name = type(self.dataset).__name__
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name}[{index}] gave a {type(image).__name__}, expected a PIL image")
        if isinstance(label, Tensor) and label.ndim == 1:  # multi-label targets: 1 present, 0 absent, -1 ignored
            if self.num_classes is not None and label.shape[0] != self.num_classes:
                raise ValueError(f"{name}[{index}] has {label.shape[0]} targets for {self.num_classes} classes")
            return self.transform(image if image.mode == "RGB" else image.convert("RGB")), label
        try:
            if isinstance(label, bool):
                raise TypeError
            label = operator.index(label)
        except TypeError:
            raise ValueError(f"{name}[{index}] has label {label!r}, expected an int class index") from None
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"{name}[{index}] has label {label}, outside [0, {self.num_classes}) of its classes")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image), label


def model_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every submodule with its training flag, so that a temporary eval() can be undone exactly."""
    return [(module, module.training) for module in model.modules()]


def extract_features(
    model: ImageTextModel,
    dataset: Any,
    batch_size: int = 256,
    num_workers: int = 0,
    kind: str = "backbone",
) -> tuple[Tensor, Tensor]:
    """Float32 features [N, D] and int64 labels [N] (targets [N, C] for a multi-label dataset), both on the CPU, of
    every item of `dataset`.

    Images get the model's evaluation view (`eval_view` with `model.spec.preprocess` size, mean and std). `kind` is
    "backbone" (`model.image_features`: the image tower's output, what probes read) or "embedding"
    (`model.encode_image`: projected into the joint space). The model runs in eval mode under no_grad on
    the device of its parameters; every submodule's train/eval mode is restored afterwards.
    """
    from slip.data.transforms import eval_view

    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
    positive_int("batch_size", batch_size)
    if len(dataset) == 0:
        raise ValueError(f"cannot extract features of an empty dataset ({type(dataset).__name__})")
    if model.spec is None:
        raise ValueError("the model has no spec (slip.models.build_model sets it), needed for the evaluation view")
    preprocess = model.spec.preprocess
    classes = getattr(dataset, "classes", None)
    transform = eval_view(preprocess.image_size, preprocess.mean, preprocess.std)
    loader = torch.utils.data.DataLoader(
        EvalViewDataset(dataset, transform, len(classes) if classes else None),
        batch_size=batch_size, num_workers=num_workers,
    )
    encode = model.image_features if kind == "backbone" else model.encode_image
    device = next(model.parameters()).device
    modes = model_modes(model)
    features, labels = [], []
    try:
        model.eval()
        with torch.no_grad():
            for images, batch_labels in loader:
                features.append(encode(images.to(device)).float().cpu())
                labels.append(batch_labels.to(torch.int64))
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(features), torch.cat(labels)


def checkpoint_fingerprint(path: str | os.PathLike, memo: dict[tuple[str, int, int], str] | None = None) -> str:
    """Hex sha256 of the file's contents, read in chunks; `memo` (keyed by path, size, mtime_ns) skips re-hashing.
    A directory (a transformers or open_clip model) hashes the names and fingerprints of the files below it."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} does not exist") from None
    if path.is_dir():
        files = sorted(item for item in path.rglob("*") if item.is_file())
        listing = [(item.relative_to(path).as_posix(), checkpoint_fingerprint(item, memo)) for item in files]
        return hashlib.sha256(repr(listing).encode()).hexdigest()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is not a file")
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    fingerprint = digest.hexdigest()
    if memo is not None:
        memo[memo_key] = fingerprint
    return fingerprint


def dataset_identity(dataset: Any) -> dict[str, object]:
    """What identifies a dataset's contents in a cache key: its class, length, and root path (else its repr)."""
    kind = type(dataset)
    identity: dict[str, object] = {"type": f"{kind.__module__}.{kind.__qualname__}", "len": len(dataset)}
    root = getattr(dataset, "root", None)
    if isinstance(root, (str, os.PathLike)):
        identity["root"] = str(Path(root).resolve())
        return identity
    if kind.__repr__ is object.__repr__:
        # The default repr holds a memory address: the key would change every run and never hit.
        raise ValueError(f"dataset {kind.__name__} has neither a `root` path nor a __repr__ that identifies it")
    identity["repr"] = repr(dataset)
    return identity


def feature_key(
    checkpoint: str, dataset: Any, split: str, image_size: int, kind: str, **extra: object
) -> dict[str, object]:
    """The cache key of one feature extraction: checkpoint fingerprint, dataset identity, split, size, kind."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
    return {"checkpoint": checkpoint, "dataset": dataset_identity(dataset), "split": split,
            "image_size": image_size, "kind": kind, **extra}


def _canonical_key(key: Mapping[str, object]) -> str:
    """The cache format and the key as sorted, compact JSON, after checking the key's required fields."""
    if not isinstance(key, Mapping):
        raise ValueError(f"feature cache key must be a mapping, got {type(key).__name__}")
    missing = [name for name in REQUIRED_KEY_FIELDS if name not in key]
    if missing:
        raise ValueError(f"feature cache key lacks {missing[0]!r} (required: {list(REQUIRED_KEY_FIELDS)})")
    for name, value in key.items():
        try:
            json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"feature cache key {name!r} is not plain JSON data: {value!r}") from None
    return json.dumps([CACHE_FORMAT, dict(key)], sort_keys=True, separators=(",", ":"), allow_nan=False)


def _as_cached_pair(result: object, origin: str) -> tuple[Tensor, Tensor]:
    """A (features, labels) pair as the cache stores it: float32 [N, D] and int64 [N] (or multi-label [N, C]),
    contiguous, on the CPU."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise ValueError(f"{origin} must be a (features, labels) tuple, got {type(result).__name__}")
    features, labels = result
    if isinstance(labels, Tensor) and labels.ndim == 2:  # multi-label targets [N, C]
        check_targets(origin, features, labels)
    else:
        check_features(origin, features, labels)
    return (features.detach().to("cpu", torch.float32).contiguous(),
            labels.detach().to("cpu", torch.int64).contiguous())


class FeatureCache:
    """(features, labels) pairs on disk under `root`, one file per key; see `load_or_compute`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"feature cache root {self.root} exists and is not a directory")
        self._fingerprints: dict[tuple[str, int, int], str] = {}

    def __repr__(self) -> str:
        """The cache folder."""
        return f"{type(self).__name__}(root={str(self.root)!r})"

    def fingerprint(self, path: str | os.PathLike) -> str:
        """`checkpoint_fingerprint(path)`, hashed once per (path, size, mtime) for the life of this cache object."""
        return checkpoint_fingerprint(path, self._fingerprints)

    def path_for(self, key: Mapping[str, object]) -> Path:
        """The file that holds the pair of `key`."""
        digest = hashlib.sha256(_canonical_key(key).encode()).hexdigest()
        return self.root / f"{digest[:40]}.pt"

    def _load(self, path: Path, canonical: str) -> tuple[Tensor, Tensor]:
        """The stored pair, or ValueError/any load error if the file is not a valid entry for `canonical`."""
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or entry.get("key") != canonical:
            raise ValueError("its stored key differs from the requested one")
        features, labels = _as_cached_pair((entry.get("features"), entry.get("labels")), "cached entry")
        if features.dtype != entry["features"].dtype or labels.dtype != entry["labels"].dtype:
            raise ValueError("its tensors have unexpected dtypes")
        return features, labels

    def load_or_compute(
        self, key: Mapping[str, object], compute: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """The pair stored for `key`; if there is none (or it is unreadable), `compute()` it and store it."""
        canonical = _canonical_key(key)
        path = self.path_for(key)
        if path.exists():
            try:
                return self._load(path, canonical)
            except Exception as error:  # any unreadable file is recomputed, never fatal
                warnings.warn(f"feature cache file {path} is unusable ({first_line(error)}); recomputing it",
                              stacklevel=2)
        features, labels = _as_cached_pair(compute(), "compute()")
        atomic_save({"key": canonical, "features": features, "labels": labels}, path)
        return features, labels


def standardize(reference: Tensor) -> Callable[[Tensor], Tensor]:
    """The map x -> (x - mean) / std with the per-dimension statistics of `reference` (constant dims: std 1)."""
    mean = reference.mean(dim=0)
    std = reference.std(dim=0, unbiased=False)
    # A dimension that is constant up to rounding would otherwise turn rounding noise into unit-scale noise.
    floor = 1e-6 * float(std.max()) if std.numel() else 0.0
    std = torch.where(std > floor, std, torch.ones_like(std))
    return lambda x: (x - mean) / std
