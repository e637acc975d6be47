"""Zero-shot classification against a plain computation: prompt ensembling, synonyms, top-k accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slip.data.labelled import ImageFolderDataset
from slip.data.synthetic import SyntheticClassification
from slip.eval.zeroshot import (ZeroShotEvaluator, text_classifier, validation_images, zero_shot_accuracy,
                                zero_shot_evaluator)
from slip.models import build_vit_model
from slip.tokenizer import tokenize
from data_helpers import write_image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vit_model(image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=4,
                           embed_dim=24, text_width=32, text_layers=2, text_heads=4, context_length=16).eval()


def naive_class_embedding(model, prompts: list[str]) -> torch.Tensor:
    """Each prompt alone through the text tower, normalised in float64; mean, then normalised again."""
    with torch.no_grad():
        rows = [F.normalize(model.encode_text(tokenize([p], 16)).double(), dim=-1)[0] for p in prompts]
    return F.normalize(torch.stack(rows).mean(dim=0), dim=0)


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(model) -> None:
    classes = ["red circle", ("blue square", "azure box"), "green triangle"]
    templates = ["a {}.", "a photo of a {}.", "art of the {}."]
    got = text_classifier(model, classes, templates, tokenize, batch_size=4)
    for row, names in zip(got, classes):
        names = [names] if isinstance(names, str) else list(names)
        expected = naive_class_embedding(model, [t.format(n) for n in names for t in templates])
        torch.testing.assert_close(row.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_templates_without_a_placeholder_are_refused(model) -> None:
    with pytest.raises(ValueError, match="'a photo.'"):
        text_classifier(model, ["cat"], ["a photo."], tokenize)


def test_top_k_accuracy_matches_a_loop(model) -> None:
    torch.manual_seed(1)
    classifier = F.normalize(torch.randn(7, 24), dim=-1)
    images, labels = torch.randn(20, 3, 32, 32), torch.randint(0, 7, (20,))
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    got = zero_shot_accuracy(model, classifier, batches, top_k=(1, 3))
    with torch.no_grad():
        scores = F.normalize(model.encode_image(images), dim=-1) @ classifier.T
    for k in (1, 3):
        hits = sum(int(label) in scores[i].argsort(descending=True)[:k].tolist() for i, label in enumerate(labels))
        assert got[f"top{k}"] == pytest.approx(100.0 * hits / 20)


def test_the_evaluator_uses_the_datasets_own_classes_and_templates(model) -> None:
    dataset = SyntheticClassification(num_samples=24, image_size=32, seed=3)
    evaluator = ZeroShotEvaluator(dataset, batch_size=10)
    assert evaluator.class_names == dataset.classes and evaluator.templates == dataset.templates
    result = evaluator(model)
    assert set(result) == {"top1", "top5"} and 0 <= result["top1"] <= result["top5"] <= 100


def test_a_named_prompt_set_replaces_folder_names_and_must_fit(model, tmp_path) -> None:
    for index, name in enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck"]):
        write_image(tmp_path / "cifar" / name / "0.png", color=(20 * index, 50, 90))
    evaluator = zero_shot_evaluator(ImageFolderDataset(str(tmp_path / "cifar")), "cifar10", "val.prompts")
    assert evaluator.class_names[1] == "automobile" and len(evaluator.templates) == 18
    write_image(tmp_path / "three" / "a" / "0.png")
    with pytest.raises(ValueError, match="val.prompts"):
        zero_shot_evaluator(ImageFolderDataset(str(tmp_path / "three")), "cifar10", "val.prompts")


def test_top_k_beyond_the_class_count_is_not_reported(model) -> None:
    classifier = F.normalize(torch.randn(3, 24), dim=-1)
    got = zero_shot_accuracy(model, classifier, [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))])
    assert set(got) == {"top1"}


@pytest.mark.parametrize(("setting", "training_images", "want"), [
    ("auto", 16, 96), ("auto", 500, 500), ("auto", 5000, None), ("all", 16, None), (None, 16, None),
    (200, 16, 200), (2000, 16, None),
])
def test_validation_size_settings(setting, training_images, want) -> None:
    assert validation_images(setting, 1000, training_images) == want


@pytest.mark.parametrize("setting", ["some", 0, -3, True, 1.5])
def test_bad_validation_size_settings_name_the_key(setting) -> None:
    with pytest.raises(ValueError, match=r"^max_images must be 'auto', 'all' or a positive number"):
        validation_images(setting, 1000, 16)


def test_a_limited_evaluator_scores_evenly_spaced_images_of_every_class(model) -> None:
    dataset = SyntheticClassification(num_samples=240, image_size=32, seed=1)
    evaluator = ZeroShotEvaluator(dataset, batch_size=50, max_images=48)
    calls = []
    evaluator(model, progress=lambda done, total: calls.append((done, total)))
    assert len(evaluator) == 48 and calls[-1] == (48, 48) and [done for done, _ in calls] == [48]
    picked = [i * 240 // 48 for i in range(48)]
    assert len({index % 24 for index in picked}) > 12  # spread over the classes (class = index % 24)
