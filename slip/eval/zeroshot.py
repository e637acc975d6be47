"""Zero-shot classification: a text classifier from class names x prompt templates, and top-k accuracy."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slip.data.labelled import check_class_names
from slip.eval.features import EvalViewDataset
from slip.eval.metrics import check_metric, report
from slip.prompts import load_prompts
from slip.models import ImageTextModel

Tokenize = Callable[[list[str], int], Tensor]
Progress = Callable[[int, int], None]
"""progress(images done, images in all), called after each batch."""
# "auto" validation never scores fewer images than this (4 per class of the synthetic task's 24).
MIN_AUTO_VALIDATION_IMAGES = 96


def reporting(batches: Iterable[tuple[Tensor, Tensor]], total: int,
               progress: Progress | None) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches, calling `progress` after each has been handed on."""
    done = 0
    for images, labels in batches:
        yield images, labels
        done += labels.shape[0]
        if progress is not None:
            progress(done, total)


@torch.no_grad()
def text_classifier(
    model: ImageTextModel,
    class_names: Sequence[str | Sequence[str]],
    templates: Sequence[str],
    tokenize: Tokenize,
    batch_size: int = 256,
) -> Tensor:
    """[C, D] class embeddings: per class, the mean of its normalised prompt embeddings, renormalised.

    A class is a name or a sequence of synonyms; the prompts of a class are every template with every name.
    """
    if not class_names or not templates:
        raise ValueError(f"zero-shot needs class names and templates, got {len(class_names)} and {len(templates)}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot template {bad[0]!r} has no '{{}}' placeholder for the class name")
    synonyms = [[names] if isinstance(names, str) else list(names) for names in class_names]
    prompts = [[template.format(name) for name in names for template in templates] for names in synonyms]
    tokens = tokenize([prompt for per_class in prompts for prompt in per_class], model.text.context_length)
    device = next(model.parameters()).device
    embeddings = torch.cat([
        F.normalize(model.encode_text(chunk.to(device)).float(), dim=-1) for chunk in tokens.split(batch_size)
    ])
    per_class = torch.stack([group.mean(dim=0) for group in embeddings.split([len(p) for p in prompts])])
    return F.normalize(per_class, dim=-1)


def _batch_scores(model: ImageTextModel, classifier: Tensor,
                  batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """(cosine similarities [B, C] of each image with each class, labels [B]) for each batch, on the model's
    device."""
    dtype = next(model.parameters()).dtype  # float32, or float64 for a run trained with trainer.precision=fp64
    for images, labels in batches:
        image_embed = F.normalize(model.encode_image(images.to(classifier.device, dtype)).float(), dim=-1)
        yield image_embed @ classifier.T, labels


@torch.no_grad()
def zero_shot_accuracy(
    model: ImageTextModel,
    classifier: Tensor,
    batches: Iterable[tuple[Tensor, Tensor]],
    top_k: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Percent top-k accuracy of `classifier` over (images, labels) batches, for each k up to the class count."""
    top_k = [k for k in top_k if k <= classifier.shape[0]]
    correct = {k: 0 for k in top_k}
    total = 0
    for scores, labels in _batch_scores(model, classifier, batches):
        hits = scores.topk(max(top_k), dim=-1).indices.cpu() == labels[:, None]
        for k in top_k:
            correct[k] += int(hits[:, :k].any(dim=-1).sum())
        total += labels.shape[0]
    if total == 0:
        raise ValueError("zero-shot evaluation got an empty dataset")
    return {f"top{k}": 100.0 * correct[k] / total for k in top_k}


@torch.no_grad()
def zero_shot_scores(model: ImageTextModel, classifier: Tensor,
                     batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """([N, C] cosine similarities of every image with every class, [N] labels), on the CPU."""
    pairs = [(scores.cpu(), labels) for scores, labels in _batch_scores(model, classifier, batches)]
    if not pairs:
        raise ValueError("zero-shot evaluation got an empty dataset")
    return torch.cat([scores for scores, _ in pairs]), torch.cat([labels for _, labels in pairs])


class ZeroShotEvaluator:
    """Callable(model) -> {top1, top5}: zero-shot accuracy on a labelled dataset.

    Class names and templates come from the arguments, else from the dataset's `classes` / `templates`.
    """

    title = "zero-shot validation"  # what training's console calls it

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 256,
        num_workers: int = 0,
        class_names: Sequence[str | Sequence[str]] | None = None,
        templates: Sequence[str] | None = None,
        max_images: int | None = None,
        metric: str = "top1",
    ) -> None:
        self.metric = check_metric(metric)
        class_names = class_names if class_names is not None else getattr(dataset, "classes", None)
        templates = templates if templates is not None else getattr(dataset, "templates", None)
        for attribute, value in (("classes", class_names), ("templates", templates)):
            if not value:
                raise ValueError(f"zero-shot dataset {type(dataset).__name__} has no {attribute}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.max_images = max_images
        self.class_names: list[str | Sequence[str]] = list(class_names)
        self.templates: list[str] = list(templates)

    def __len__(self) -> int:
        """The number of images scored: the dataset's, or `max_images` of them evenly spaced over it."""
        size = len(self.dataset)
        return size if self.max_images is None else min(size, self.max_images)

    def __call__(self, model: ImageTextModel, progress: Progress | None = None) -> dict[str, float]:
        """Build the text classifier with `model`, then score the images; `progress(done, total)` after each batch."""
        from slip.data.transforms import eval_view
        from slip.tokenizer import tokenize

        preprocess = model.spec.preprocess
        transform = eval_view(preprocess.image_size, preprocess.mean, preprocess.std)
        images = EvalViewDataset(self.dataset, transform, len(self.class_names))
        if len(self) < len(self.dataset):  # evenly spaced, so class-sorted datasets keep every class
            images = torch.utils.data.Subset(images, [i * len(self.dataset) // len(self) for i in range(len(self))])
        loader = torch.utils.data.DataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers)
        classifier = text_classifier(model, self.class_names, self.templates, tokenize)
        batches = reporting(loader, len(self), progress)
        if self.metric == "top1":  # streamed: no [N, C] score matrix held
            return zero_shot_accuracy(model, classifier, batches)
        return report(self.metric, *zero_shot_scores(model, classifier, batches))


def validation_images(setting: int | str | None, dataset_size: int, training_images: int) -> int | None:
    """How many images validation scores: "all" (or None) -> every one; a number -> at most that many; "auto" ->
    at most as many as the run trains on, and at least `MIN_AUTO_VALIDATION_IMAGES` (None where that is all)."""
    if setting is None or setting == "all":
        return None
    if setting == "auto":
        limit = max(MIN_AUTO_VALIDATION_IMAGES, training_images)
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        limit = setting
    else:
        raise ValueError(f"max_images must be 'auto', 'all' or a positive number, got {setting!r}")
    return None if limit >= dataset_size else limit


def zero_shot_evaluator(
    dataset: Any, prompts: str | None, where: str, batch_size: int = 256, num_workers: int = 0,
    max_images: int | None = None, metric: str = "top1",
) -> ZeroShotEvaluator:
    """An evaluator for `dataset` (`max_images` of them, evenly spaced, when given), with the class names and templates
    of prompt set `prompts` when given.

    `where` names the config key of `prompts` in the error raised when its classes do not fit the dataset.
    """
    if not prompts:
        return ZeroShotEvaluator(dataset, batch_size, num_workers, max_images=max_images, metric=metric)
    prompt_set = load_prompts(prompts)
    check_class_names(list(dataset.classes), list(prompt_set.classes), where)
    return ZeroShotEvaluator(dataset, batch_size, num_workers, prompt_set.synonyms or prompt_set.classes,
                             prompt_set.templates, max_images, metric)
