"""Feature extraction equals a per-image loop; the feature cache hits, misses and recovers as it should."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slip.data.synthetic import SyntheticClassification
from slip.data.transforms import eval_view
from slip.eval.features import (
    FeatureCache,
    checkpoint_fingerprint,
    dataset_identity,
    extract_features,
    feature_key,
)
from slip.models import build_vit_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    """A seeded ViT small enough to run a few 32 px images in milliseconds."""
    torch.manual_seed(0)
    return build_vit_model(image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=4,
                           embed_dim=24, text_width=32, text_layers=1, text_heads=4, context_length=16,
                           vocab_size=100, inputs=("image", "text"))


class PngFolder:
    """A labelled dataset of PNG files written into a folder: varied sizes and modes, numpy labels."""

    def __init__(self, root: Path, count: int = 7) -> None:
        self.root = root
        self.classes = ["dark", "mid", "bright"]
        self.items = []
        rng = np.random.default_rng(0)
        for i in range(count):
            size = (36 + 3 * i, 30 + 5 * i)  # not square, not the model's size
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB")
            path = root / f"{i}.png"
            image.save(path)
            self.items.append((path, np.int64(i % 3)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as image:
            return image.copy(), label


def manual_features(model, dataset, kind):
    """One image at a time through the eval view and the model, in eval mode."""
    preprocess = model.spec.preprocess
    view = eval_view(preprocess.image_size, preprocess.mean, preprocess.std)
    encode = model.image_features if kind == "backbone" else model.encode_image
    model.eval()
    rows, labels = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            rows.append(encode(view(image.convert("RGB"))[None])[0])
            labels.append(int(label))
    return torch.stack(rows), torch.tensor(labels)


@pytest.mark.parametrize("kind", ["backbone", "embedding"])
def test_extraction_equals_a_per_image_loop(tmp_path, kind):
    model = tiny_model()
    dataset = PngFolder(tmp_path)
    model.train()
    model.visual.blocks[0].eval()  # a mixed state, to be restored exactly
    modes_before = [m.training for m in model.modules()]
    seen_modes = []
    hook = model.visual.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    features, labels = extract_features(model, dataset, batch_size=3, kind=kind)
    hook.remove()
    assert seen_modes == [False] * 3  # three batches of 3, 3, 1, all in eval mode
    assert [m.training for m in model.modules()] == modes_before
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    assert features.shape == (7, 48 if kind == "backbone" else 24)
    expected, expected_labels = manual_features(model, dataset, kind)
    assert torch.equal(labels, expected_labels)
    assert torch.allclose(features, expected, atol=1e-5, rtol=1e-4)


def test_extraction_of_the_synthetic_task_and_bad_items():
    model = tiny_model()
    dataset = SyntheticClassification(num_samples=5, image_size=40)
    features, labels = extract_features(model, dataset, batch_size=4)
    assert torch.equal(labels, torch.tensor([dataset.label(i) for i in range(5)]))
    assert torch.allclose(features, manual_features(model, dataset, "backbone")[0], atol=1e-5, rtol=1e-4)

    class BadLabels(SyntheticClassification):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return image, label + 24 if index == 2 else label

    with pytest.raises(ValueError, match=r"BadLabels\[2\] has label 26, outside \[0, 24\)"):
        extract_features(model, BadLabels(num_samples=3, image_size=40))
    with pytest.raises(ValueError, match="feature kind"):
        extract_features(model, dataset, kind="logits")
    with pytest.raises(ValueError, match="empty dataset"):
        extract_features(model, [])


def test_checkpoint_fingerprint_is_the_sha256_of_the_file(tmp_path):
    path = tmp_path / "model.pt"
    payload = np.random.default_rng(1).bytes(2_500_000)  # several read chunks
    path.write_bytes(payload)
    memo = {}
    assert checkpoint_fingerprint(path, memo) == hashlib.sha256(payload).hexdigest()
    # The memo answers for an unchanged (path, size, mtime); it is keyed so that any rewrite misses it.
    stat = path.stat()
    path.write_bytes(payload[::-1])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint_fingerprint(path, memo) == hashlib.sha256(payload).hexdigest()
    assert checkpoint_fingerprint(path) == hashlib.sha256(payload[::-1]).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint_fingerprint(tmp_path / "missing.pt")


class Counter:
    """A compute function that counts its calls and returns fixed random features."""

    def __init__(self, seed: int = 0) -> None:
        self.calls = 0
        g = torch.Generator().manual_seed(seed)
        self.features, self.labels = torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)

    def __call__(self):
        self.calls += 1
        return self.features, self.labels


def make_key(cache, checkpoint, split="train"):
    """The key of the synthetic task's features for `checkpoint` as it is now."""
    return feature_key(cache.fingerprint(checkpoint), SyntheticClassification(num_samples=9), split, 32, "backbone")


def test_cache_hits_without_recomputing_and_misses_on_a_new_key(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights v1")
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter()
    first = cache.load_or_compute(make_key(cache, checkpoint), compute)
    second = FeatureCache(tmp_path / "cache").load_or_compute(make_key(cache, checkpoint), compute)
    assert compute.calls == 1
    for a, b, original in zip(first, second, (compute.features, compute.labels)):
        assert torch.equal(a, original) and torch.equal(b, original) and a.dtype == b.dtype
    cache.load_or_compute(make_key(cache, checkpoint, split="test"), compute)
    assert compute.calls == 2
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".pt", ".pt"]  # no temporary files left


def test_cache_recomputes_when_the_checkpoint_changes(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights v1")
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter()
    cache.load_or_compute(make_key(cache, checkpoint), compute)
    stat = checkpoint.stat()
    checkpoint.write_bytes(b"weights v2")  # same size; a later mtime
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    cache.load_or_compute(make_key(cache, checkpoint), compute)
    assert compute.calls == 2
    cache.load_or_compute(make_key(cache, checkpoint), compute)
    assert compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key"])
def test_cache_recomputes_a_damaged_file_with_a_warning(tmp_path, damage):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter()
    key = make_key(cache, checkpoint)
    path = cache.path_for(key)
    cache.load_or_compute(key, compute)
    if damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    else:
        other = make_key(cache, checkpoint, split="val")
        cache.load_or_compute(other, Counter(seed=1))
        cache.path_for(other).replace(path)
    with pytest.warns(UserWarning, match=f"feature cache file {path} is unusable"):
        features, labels = cache.load_or_compute(key, compute)
    assert compute.calls == 2 and torch.equal(features, compute.features) and torch.equal(labels, compute.labels)
    cache.load_or_compute(key, compute)  # the rewritten file is good again
    assert compute.calls == 2


def test_cache_keys_are_checked(tmp_path):
    cache = FeatureCache(tmp_path)
    good = {"checkpoint": "abc", "dataset": {"type": "x"}, "split": "train", "image_size": 32, "kind": "backbone"}
    assert cache.path_for(good) == cache.path_for(dict(reversed(list(good.items()))))  # order does not matter
    assert cache.path_for(good) != cache.path_for({**good, "image_size": 64})
    with pytest.raises(ValueError, match="lacks 'split'"):
        cache.load_or_compute({k: v for k, v in good.items() if k != "split"}, Counter())
    with pytest.raises(ValueError, match="key 'extra' is not plain JSON"):
        cache.load_or_compute({**good, "extra": object()}, Counter())
    with pytest.raises(ValueError, match=r"compute\(\) labels"):
        cache.load_or_compute(good, lambda: (torch.zeros(3, 2), torch.zeros(3)))


def test_dataset_identity(tmp_path):
    folder = PngFolder(tmp_path, count=2)
    assert dataset_identity(folder) == {"type": f"{__name__}.PngFolder", "len": 2, "root": str(tmp_path.resolve())}
    synthetic = dataset_identity(SyntheticClassification(num_samples=3, seed=5))
    assert synthetic["repr"] == "SyntheticClassification(num_samples=3, image_size=64, seed=5)"
    assert synthetic != dataset_identity(SyntheticClassification(num_samples=3, seed=6))

    class Anonymous:
        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="Anonymous has neither a `root`"):
        dataset_identity(Anonymous())
