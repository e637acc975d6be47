"""Retrieval: recall@K against a naive per-row loop, grouping of caption records per image, and the model path."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from slip.data.sources import CocoCaptionsSource, CsvSource
from slip.data.synthetic import SyntheticShapes
from slip.data.transforms import eval_view
from slip.eval.retrieval import CaptionedImages, recall_at_k, retrieval_scores
from slip.models import build_vit_model
from slip.tokenizer import tokenize

KS = (1, 2, 5, 10)


def naive_recall(image_embed, text_embed, text_to_image, ks):
    """Recall@K by sorting every row in Python, float64, ties broken by the lower index."""
    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in rows.double().tolist()]

    images, texts, owner = unit(image_embed), unit(text_embed), list(text_to_image)

    def similarity(a, b):
        return sum(x * y for x, y in zip(a, b))

    image_hits = dict.fromkeys(ks, 0)
    for i, image in enumerate(images):
        order = sorted(range(len(texts)), key=lambda j: (-similarity(image, texts[j]), j))
        first = next(position for position, j in enumerate(order) if owner[j] == i)
        for k in ks:
            image_hits[k] += first < k
    text_hits = dict.fromkeys(ks, 0)
    for j, text in enumerate(texts):
        order = sorted(range(len(images)), key=lambda i: (-similarity(text, images[i]), i))
        for k in ks:
            text_hits[k] += owner[j] in order[:k]
    result = {f"image_to_text_R@{k}": 100.0 * image_hits[k] / len(images) for k in ks}
    result.update({f"text_to_image_R@{k}": 100.0 * text_hits[k] / len(texts) for k in ks})
    return result


def random_owners(num_images, num_texts, generator):
    """A caption -> image assignment that gives every image at least one caption, in shuffled order."""
    owners = torch.cat([torch.arange(num_images), torch.randint(num_images, (num_texts - num_images,),
                                                                generator=generator)])
    return owners[torch.randperm(num_texts, generator=generator)]


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_recall_matches_naive_loop_on_random_data(chunk_size):
    generator = torch.Generator().manual_seed(0)
    # Correlated captions (their image plus noise), so recalls fall strictly between 0 and 100.
    images = torch.randn(23, 6, generator=generator, dtype=torch.float64)
    owners = random_owners(23, 61, generator)
    texts = images[owners] + 1.5 * torch.randn(61, 6, generator=generator, dtype=torch.float64)
    expected = naive_recall(images, texts, owners, KS)
    assert recall_at_k(images, texts, owners, KS, chunk_size=chunk_size) == expected
    assert 0 < expected["image_to_text_R@1"] < 100 and 0 < expected["text_to_image_R@1"] < 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [3, 100])
def test_recall_matches_naive_loop_with_many_ties(dtype, chunk_size):
    # Rows with four entries of +-1 among five: unit rows of +-0.5 and 0, so every similarity is an exact
    # multiple of 1/4 in any precision and summation order; exact ties and duplicate rows are everywhere.
    generator = torch.Generator().manual_seed(1)

    def sparse_signs(rows):
        values = torch.randint(0, 2, (rows, 5), generator=generator) * 2 - 1
        keep = torch.rand(rows, 5, generator=generator).argsort(dim=1) < 4
        return (values * keep).to(dtype)

    images, texts = sparse_signs(30), sparse_signs(70)
    owners = random_owners(30, 70, generator)
    expected = naive_recall(images, texts, owners, KS)
    assert recall_at_k(images, texts, owners, KS, chunk_size=chunk_size) == expected


def test_ties_rank_the_lower_index_first():
    # All similarities equal: image i's caption is caption i, ranked i-th; caption j's image ranks j-th.
    same = torch.ones(4, 3)
    result = recall_at_k(same, same, [0, 1, 2, 3], ks=(1, 2))
    assert result == {"image_to_text_R@1": 25.0, "image_to_text_R@2": 50.0,
                      "text_to_image_R@1": 25.0, "text_to_image_R@2": 50.0}
    # Image 0 owns captions 0 and 2: its tied best is caption 0, at rank 0 (not caption 2, at rank 2).
    result = recall_at_k(torch.ones(2, 3), torch.ones(3, 3), [0, 1, 0], ks=(1, 2))
    assert result == {"image_to_text_R@1": 50.0, "image_to_text_R@2": 100.0,
                      "text_to_image_R@1": 200.0 / 3, "text_to_image_R@2": 100.0}


def test_an_image_is_a_hit_when_any_of_its_captions_is():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Image 0's first caption points away from it (nearer image 1), its second one is exact; image 1 has one.
    texts = torch.tensor([[-1.0, 0.2], [3.0, 0.0], [0.0, 5.0]])
    result = recall_at_k(images, texts, [0, 0, 1], ks=(1,))
    assert result == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 200.0 / 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.ones(2, 3), torch.ones(2, 4), [0, 1]), "image_embed has dim 3 but text_embed has dim 4"),
        ((torch.ones(2, 3), torch.ones(2, 3), [0, 2]), "image index 2, outside [0, 2)"),
        ((torch.ones(2, 3), torch.ones(2, 3), [0]), "text_to_image must have shape (2,)"),
        ((torch.ones(3, 3), torch.ones(2, 3), [0, 2]), "image 1 has no caption"),
        ((torch.ones(0, 3), torch.ones(2, 3), [0, 0]), "image_embed must be a non-empty"),
        ((torch.ones(2, 3), torch.full((2, 3), math.nan), [0, 1]), "text_embed has NaN"),
    ],
)
def test_recall_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        recall_at_k(*args)


@pytest.mark.parametrize("ks", [(), (0,), (1.5,), (True,)])
def test_recall_rejects_bad_ks(ks):
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(torch.ones(1, 2), torch.ones(1, 2), [0], ks=ks)


# ---------------------------------------------------------------------------------------------------------
# Grouping records per image

COLORS = {"a.png": (200, 20, 20), "b.png": (20, 200, 20), "c.png": (20, 20, 200), "d.png": (240, 240, 0)}


def write_images(folder: Path, sizes=None) -> None:
    """Solid-colour PNGs named after COLORS (non-square when sizes say so)."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)  # so that "sub/../a.png" resolves
    for name, color in COLORS.items():
        Image.new("RGB", (sizes or {}).get(name, (20, 20)), color).save(folder / name)


def write_csv(path: Path, rows) -> Path:
    """A CSV of (filepath, title) rows with a header."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path


ROWS = [("a.png", "red one"), ("b.png", "green one"), ("./a.png", "a red square"), ("c.png", "blue one"),
        ("b.png", "a green square"), ("sub/../a.png", "crimson")]


def test_csv_rows_of_one_image_are_grouped(tmp_path):
    write_images(tmp_path)
    images = CaptionedImages(CsvSource(str(write_csv(tmp_path / "pairs.csv", ROWS)), group_by_image=False))
    assert images.groups == [[0, 2, 5], [1, 4], [3]]
    loaded = [images.load(i) for i in range(len(images))]
    assert [captions for _, captions in loaded] == [["red one", "a red square", "crimson"],
                                                    ["green one", "a green square"], ["blue one"]]
    assert [image.getpixel((0, 0)) for image, _ in loaded] == [COLORS["a.png"], COLORS["b.png"], COLORS["c.png"]]


def test_coco_records_are_already_one_per_image(tmp_path):
    write_images(tmp_path / "val")
    annotations = {
        "images": [{"id": 7, "file_name": "b.png"}, {"id": 9, "file_name": "a.png"}],
        "annotations": [{"image_id": 9, "caption": "red"}, {"image_id": 7, "caption": "green"},
                        {"image_id": 9, "caption": "scarlet"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    images = CaptionedImages(CocoCaptionsSource(str(tmp_path / "captions.json"), str(tmp_path / "val")))
    assert len(images) == 2
    assert images.load(0)[1] == ["red", "scarlet"] and images.load(1)[1] == ["green"]


def test_a_source_without_image_paths_has_one_image_per_record():
    source = SyntheticShapes(num_samples=3, image_size=16)
    images = CaptionedImages(source)
    assert len(images) == 3
    image, captions = images.load(2)
    expected_image, expected_captions = source.load(2)
    assert captions == expected_captions and image.tobytes() == expected_image.tobytes()


# ---------------------------------------------------------------------------------------------------------
# Scoring a model


def tiny_model():
    torch.manual_seed(0)
    return build_vit_model(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                           embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=12,
                           inputs=("image", "text"))


@pytest.mark.parametrize("batch_size", [2, 256])
def test_retrieval_scores_equal_scoring_each_image_and_caption_alone(tmp_path, batch_size):
    write_images(tmp_path, sizes={"b.png": (30, 18), "c.png": (12, 25)})
    rows = ROWS[:5] + [("d.png", "yellow"), ("c.png", "a blue square"), ("d.png", "a yellow thing")]
    source = CsvSource(str(write_csv(tmp_path / "pairs.csv", rows)))
    model = tiny_model().train()
    result = retrieval_scores(model, source, batch_size=batch_size, ks=(1, 2, 3))
    assert model.training  # restored after evaluation

    model.eval()
    preprocess = model.spec.preprocess
    view = eval_view(preprocess.image_size, preprocess.mean, preprocess.std)
    names = ["a.png", "b.png", "c.png", "d.png"]  # order of first appearance in the CSV
    with torch.no_grad():
        image_embed = torch.cat([
            model.encode_image(view(Image.open(tmp_path / name).convert("RGB"))[None]) for name in names
        ])
        text_embed = torch.cat([model.encode_text(tokenize([caption], 12)) for _, caption in rows])
    owners = [names.index(path.removeprefix("./")) for path, _ in rows]
    expected = naive_recall(image_embed, text_embed, owners, (1, 2, 3))
    assert result.keys() == expected.keys()
    assert result == pytest.approx(expected)


def test_retrieval_scores_on_synthetic_shapes():
    result = retrieval_scores(tiny_model(), SyntheticShapes(num_samples=5, image_size=20), batch_size=3)
    assert sorted(result) == sorted(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    # 5 images x 2 captions: R@10 is certain both ways (10 captions, 5 images).
    assert result["image_to_text_R@10"] == 100.0 and result["text_to_image_R@10"] == 100.0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_bad_image_is_a_one_line_error_naming_the_file(tmp_path, num_workers):
    write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    source = CsvSource(str(write_csv(tmp_path / "pairs.csv", [("a.png", "red"), ("broken.png", "odd")])))
    with pytest.raises(ValueError) as error:
        retrieval_scores(tiny_model(), source, batch_size=2, num_workers=num_workers)
    message = str(error.value)
    assert str(tmp_path / "broken.png") in message and "corrupt" in message and "\n" not in message


def test_a_missing_image_or_empty_caption_is_an_error(tmp_path):
    write_images(tmp_path)
    missing = CsvSource(str(write_csv(tmp_path / "missing.csv", [("a.png", "red"), ("gone.png", "x")])))
    with pytest.raises(ValueError, match=r"missing: .*gone\.png"):
        retrieval_scores(tiny_model(), missing)
    blank = CsvSource(str(write_csv(tmp_path / "blank.csv", [("a.png", "red"), ("b.png", "  ")])))
    with pytest.raises(ValueError, match=r"empty_caption: .*blank\.csv\[1\]"):
        retrieval_scores(tiny_model(), blank)


def test_an_empty_source_is_an_error(tmp_path):
    source = CsvSource(str(write_csv(tmp_path / "empty.csv", [])))
    with pytest.raises(ValueError, match="the CsvSource has no records"):
        retrieval_scores(tiny_model(), source)


def test_a_model_without_text_tower_is_an_error():
    model = build_vit_model(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                            ssl_mlp_dim=16, ssl_embed_dim=8, inputs=("aug1", "aug2"))
    with pytest.raises(ValueError, match="needs a model with a text tower"):
        retrieval_scores(model, SyntheticShapes(num_samples=2, image_size=16))
