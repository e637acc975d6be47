"""Image<->text retrieval: recall@K of a model over images that each have one or more captions.

Both directions are scored on cosine similarity in the joint space:
- image -> text: an image is a hit at K when ANY of its captions is among its K most similar captions;
- text -> image: a caption is a hit at K when its own image is among its K most similar images.

Ties are broken by position: among equally similar candidates the one with the lower index ranks first
(captions and images in the order they are given, i.e. the source's record order). So a hit never depends on
the order in which a sorting routine happens to return equal scores.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from slip.data.decode import BadSample
from slip.data.sources import Source
from slip.models import ImageTextModel

__all__ = ["CaptionedImages", "recall_at_k", "retrieval_scores"]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Positive integer K values, in the given order."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _check_embeddings(name: str, embed: Tensor) -> None:
    """A non-empty, finite [N, D] tensor."""
    if embed.ndim != 2 or embed.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got shape {tuple(embed.shape)}")
    if not torch.isfinite(embed).all():
        raise ValueError(f"{name} has NaN or infinite values")


def _check_text_to_image(text_to_image: Tensor, num_texts: int, num_images: int) -> None:
    """One image index per caption, in range, and at least one caption per image."""
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        bad = int(text_to_image[(text_to_image < 0) | (text_to_image >= num_images)][0])
        raise ValueError(f"text_to_image holds image index {bad}, outside [0, {num_images})")
    captionless = (torch.bincount(text_to_image, minlength=num_images) == 0).nonzero()
    if len(captionless):
        raise ValueError(f"image {int(captionless[0])} has no caption in text_to_image")


def _best_target_rank(scores: Tensor, is_target: Tensor) -> Tensor:
    """Per row, the 0-based rank of its best-ranked target column; ties rank the lower column first.

    The best-ranked target is the one with the highest score, the lowest column among equal scores; every
    other target ranks below it, so its rank is the row's best.
    """
    columns = torch.arange(scores.shape[1], device=scores.device)
    best = scores.masked_fill(~is_target, float("-inf")).amax(dim=1, keepdim=True)
    at_best = scores == best
    first = torch.where(at_best & is_target, columns, scores.shape[1]).amin(dim=1, keepdim=True)
    return (scores > best).sum(dim=1) + (at_best & (columns < first)).sum(dim=1)


def recall_at_k(
    image_embed: Tensor,
    text_embed: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """Percent recall@K both ways ("image_to_text_R@K", "text_to_image_R@K") on cosine similarity.

    `text_to_image[j]` is the index of caption j's image. Similarities are computed in float64 when either
    input is float64, else in float32, `chunk_size` query rows at a time (memory ~ chunk_size x candidates).
    Ties: see the module docstring.
    """
    ks = _check_ks(ks)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_embeddings("image_embed", image_embed)
    _check_embeddings("text_embed", text_embed)
    if image_embed.shape[1] != text_embed.shape[1]:
        raise ValueError(f"image_embed has dim {image_embed.shape[1]} but text_embed has dim {text_embed.shape[1]}")
    device = image_embed.device
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.int64, device=device)
    num_images, num_texts = image_embed.shape[0], text_embed.shape[0]
    _check_text_to_image(text_to_image, num_texts, num_images)

    dtype = torch.float64 if torch.float64 in (image_embed.dtype, text_embed.dtype) else torch.float32
    images = F.normalize(image_embed.to(dtype), dim=-1)
    texts = F.normalize(text_embed.to(device, dtype), dim=-1)

    image_ranks = torch.cat([
        _best_target_rank(chunk @ texts.T, text_to_image[None, :] == ids[:, None])
        for chunk, ids in zip(images.split(chunk_size), torch.arange(num_images, device=device).split(chunk_size))
    ])
    image_ids = torch.arange(num_images, device=device)
    text_ranks = torch.cat([
        _best_target_rank(chunk @ images.T, image_ids[None, :] == targets[:, None])
        for chunk, targets in zip(texts.split(chunk_size), text_to_image.split(chunk_size))
    ])
    scores = {f"image_to_text_R@{k}": 100.0 * int((image_ranks < k).sum()) / num_images for k in ks}
    scores.update({f"text_to_image_R@{k}": 100.0 * int((text_ranks < k).sum()) / num_texts for k in ks})
    return scores


class CaptionedImages:
    """The distinct images of a source, each with all its captions; `load(i)` -> (image, captions).

    When the source has ``image_path(index)`` (the file sources: a CSV lists one caption per row), records
    with the same path are one image, in order of first appearance; otherwise each record is one image.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        image_path: Callable[[int], str] | None = getattr(source, "image_path", None)
        if image_path is None:
            self.groups: list[list[int]] = [[index] for index in range(len(source))]
        else:
            by_path: dict[str, list[int]] = {}
            for index in range(len(source)):
                by_path.setdefault(image_path(index), []).append(index)
            self.groups = list(by_path.values())

    def __len__(self) -> int:
        """Number of distinct images."""
        return len(self.groups)

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The RGB image `index` and the captions of all its records, in record order; raises BadSample."""
        records = self.groups[index]
        image, captions = self.source.load(records[0])
        captions = list(captions)
        for record in records[1:]:  # grouped records come from file sources, which read captions alone
            captions.extend(self.source.captions(record))
        return image, captions


class _EvalItems(torch.utils.data.Dataset):
    """(index, transformed image, captions, None), or (index, None, None, error message) for a bad sample.

    Errors travel as data, so a DataLoader worker does not wrap them in a multi-line traceback.
    """

    def __init__(self, images: CaptionedImages, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, list[str] | None, str | None]:
        try:
            image, captions = self.images.load(index)
        except BadSample as error:
            return index, None, None, str(error)
        return index, self.transform(image), captions, None


def _as_list(batch: list[Any]) -> list[Any]:
    """Collate that keeps the items as they are."""
    return batch


@torch.no_grad()
def retrieval_scores(
    model: ImageTextModel,
    source: Source,
    batch_size: int = 256,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways of `model` on every image and caption of `source` (see `recall_at_k`).

    Images get the eval view of the model's spec; captions are tokenized to its context length. A bad image
    or caption is an error (naming the file), never skipped: skipping would change the benchmark.
    """
    from slip.data.transforms import eval_view
    from slip.tokenizer import tokenize

    ks = _check_ks(ks)
    if "text" not in model.inputs:
        raise ValueError("retrieval needs a model with a text tower; this one was built for an SSL-only objective")
    images = CaptionedImages(source)
    if len(images) == 0:
        raise ValueError(f"retrieval needs at least one image, but the {type(source).__name__} has no records")
    preprocess = model.spec.preprocess
    transform = eval_view(preprocess.image_size, preprocess.mean, preprocess.std)
    loader = torch.utils.data.DataLoader(_EvalItems(images, transform), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_as_list)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_embeds: list[Tensor] = []
        captions: list[str] = []
        text_to_image: list[int] = []
        for batch in loader:
            for index, _, texts, error in batch:
                if error is not None:
                    raise ValueError(f"retrieval: bad sample, {error}")
                captions.extend(texts)
                text_to_image.extend([index] * len(texts))
            pixels = torch.stack([item[1] for item in batch]).to(device)
            image_embeds.append(model.encode_image(pixels).float())
        tokens = tokenize(captions, model.spec.text.context_length)
        text_embeds = [model.encode_text(chunk.to(device)).float() for chunk in tokens.split(batch_size)]
    finally:
        model.train(was_training)
    return recall_at_k(torch.cat(image_embeds), torch.cat(text_embeds), text_to_image, ks)
