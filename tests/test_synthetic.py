"""The generated dataset: determinism, disjoint streams, captions and labels that agree with the pixels."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from slip.data.synthetic import COLORS, SHAPES, SIZES, SyntheticClassification, SyntheticShapes, photo_like

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
NAMES = list(COLORS)
# A pixel within this RGB distance of a palette colour is that colour; the gray background is far further.
COLOR_RADIUS = 70.0
MIN_OBJECT_PIXELS = 10


def color_masks(image: Image.Image) -> dict[str, np.ndarray]:
    """Pixel mask of each palette colour that covers at least MIN_OBJECT_PIXELS pixels."""
    pixels = np.asarray(image, dtype=np.float64)
    distance = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)
    nearest, close = distance.argmin(axis=-1), distance.min(axis=-1) < COLOR_RADIUS
    masks = {name: close & (nearest == k) for k, name in enumerate(NAMES)}
    return {name: mask for name, mask in masks.items() if mask.sum() >= MIN_OBJECT_PIXELS}


def centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) mean of the mask's pixel centres."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def words_of(caption: str) -> set[str]:
    """Colour, shape and size words used in a caption."""
    return set(caption.split()) & (set(COLORS) | set(SHAPES) | set(SIZES))


def test_samples_are_pure_functions_of_split_seed_and_index():
    first, second = SyntheticShapes(num_samples=50), SyntheticShapes(num_samples=50)
    order = [7, 0, 42, 7, 13]
    loaded = {i: first.load(i) for i in order}
    for i in reversed(order):
        image, captions = second.load(i)
        assert np.array_equal(np.asarray(image), np.asarray(loaded[i][0]))
        assert captions == loaded[i][1]
    copy = pickle.loads(pickle.dumps(first))
    assert np.array_equal(np.asarray(copy.load(13)[0]), np.asarray(loaded[13][0]))
    assert np.array_equal(np.asarray(first.load(-1)[0]), np.asarray(first.load(49)[0]))


def test_splits_seeds_and_the_classification_stream_differ():
    shapes = [SyntheticShapes(split, 10, seed=seed) for split, seed in [("train", 0), ("val", 0), ("test", 0),
                                                                         ("train", 1)]]
    classification = [SyntheticClassification(10, seed=seed) for seed in (0, 1)]
    for i in range(5):
        images = [np.asarray(d.load(i)[0]) for d in shapes] + [np.asarray(d[i][0]) for d in classification]
        for a in range(len(images)):
            for b in range(a + 1, len(images)):
                assert not np.array_equal(images[a], images[b])


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_images_are_rgb_of_the_requested_size(image_size):
    dataset = SyntheticShapes(num_samples=3, image_size=image_size)
    image, captions = dataset.load(2)
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    assert len(dataset) == 3 and captions


def test_captions_name_exactly_the_colours_in_the_pixels():
    dataset = SyntheticShapes(num_samples=200)
    counts = {1: 0, 2: 0}
    for i in range(200):
        image, captions = dataset.load(i)
        scene = dataset.scene(i)
        counts[len(scene.objects)] += 1
        assert len(captions) >= 2 and all(isinstance(c, str) and c.strip() for c in captions)
        seen = set(color_masks(image))
        for caption in captions:
            assert set(caption.split()) & set(COLORS) == seen
            assert words_of(caption) == words_of(captions[0])  # paraphrases name the same things
        for obj in scene.objects:
            x, y = (int(v) for v in obj.center)
            pixel = np.asarray(image, dtype=np.float64)[y, x]
            assert NAMES[np.linalg.norm(PALETTE - pixel, axis=1).argmin()] == obj.color
            assert all(obj.color in c and obj.shape in c and obj.size in c for c in captions)
    assert counts[1] > 20 and counts[2] > 100  # both kinds of scene occur


def test_relations_in_captions_match_object_positions_in_the_pixels():
    dataset = SyntheticShapes(num_samples=200)
    checked = set()
    for i in range(200):
        scene = dataset.scene(i)
        if len(scene.objects) != 2 or scene.objects[0].color == scene.objects[1].color:
            continue
        image, (caption, paraphrase) = dataset.load(i)
        masks = color_masks(image)
        (x1, y1), (x2, y2) = (centroid(masks[obj.color]) for obj in scene.objects)
        if " above " in caption:
            assert y1 < y2 and " below " in paraphrase
        elif " below " in caption:
            assert y1 > y2 and " above " in paraphrase
        elif " to the left of " in caption:
            assert x1 < x2 and " to the right of " in paraphrase
        else:
            assert " to the right of " in caption
            assert x1 > x2 and " to the left of " in paraphrase
        first, second = scene.objects
        assert caption.startswith(first.phrase) and caption.endswith(second.phrase)
        assert paraphrase.startswith(second.phrase) and paraphrase.endswith(first.phrase)
        checked.add(scene.relation)
    assert checked == {"above", "below", "to the left of", "to the right of"}


def test_object_sizes_in_the_pixels_follow_the_size_words():
    dataset = SyntheticClassification(num_samples=192)
    areas = {(shape, size): [] for shape in SHAPES for size in SIZES}
    for i in range(len(dataset)):
        image, _ = dataset[i]
        (mask,) = color_masks(image).values()
        obj = dataset.scene(i).objects[0]
        areas[obj.shape, obj.size].append(mask.sum())
    for shape in SHAPES:
        assert areas[shape, "small"] and areas[shape, "large"]
        assert max(areas[shape, "small"]) < min(areas[shape, "large"])


def test_classification_labels_match_the_pixels():
    dataset = SyntheticClassification(num_samples=120)
    assert len(dataset.classes) == len(COLORS) * len(SHAPES) == len(set(dataset.classes))
    labels = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        labels.append(label)
        color, shape = dataset.classes[label].split()
        masks = color_masks(image)
        assert list(masks) == [color]  # one object, of the class colour, on a background of no palette colour
        (obj,) = dataset.scene(i).objects
        assert (obj.color, obj.shape) == (color, shape)
        assert np.abs(centroid(masks[color]) - np.array(obj.center)).max() < 2.0
    assert np.bincount(labels).tolist() == [5] * 24  # balanced: chance is 1 / len(classes)


def test_classification_templates_and_iteration():
    dataset = SyntheticClassification(num_samples=5)
    assert dataset.templates and all(t.count("{}") == 1 for t in dataset.templates)
    assert len(list(dataset)) == 5
    with pytest.raises(IndexError):
        dataset[5]


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SyntheticShapes(split="training"), "split"),
        (lambda: SyntheticShapes(num_samples=0), "num_samples"),
        (lambda: SyntheticShapes(image_size=8), "image_size"),
        (lambda: SyntheticShapes(seed=-1), "seed"),
        (lambda: SyntheticShapes(seed=1.5), "seed"),
        (lambda: SyntheticClassification(num_samples=-3), "num_samples"),
        (lambda: SyntheticClassification(image_size=True), "image_size"),
        (lambda: SyntheticClassification(seed="0"), "seed"),
    ],
)
def test_bad_arguments_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_out_of_range_index_raises():
    dataset = SyntheticShapes(num_samples=4)
    with pytest.raises(IndexError):
        dataset.load(4)
    with pytest.raises(IndexError):
        dataset.load(-5)
    with pytest.raises(TypeError):
        dataset.load(1.0)


def test_photo_like_images_are_deterministic_rgb_of_the_asked_size_with_photo_statistics():
    image = photo_like(96, 64, seed=3)
    assert image.mode == "RGB" and image.size == (96, 64)
    assert np.array_equal(np.asarray(image), np.asarray(photo_like(96, 64, seed=3)))
    assert not np.array_equal(np.asarray(image), np.asarray(photo_like(96, 64, seed=4)))
    pixels = np.asarray(image).astype(float)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # varied, not flat
