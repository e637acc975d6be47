"""`ImageTextDataset`: a source's records as training samples, views applied, bad samples skipped and counted.

Every sample dict also carries ``"_skipped"`` ({kind: count} of the bad samples passed over to produce it) and
``"_skipped_examples"`` (a few one-line descriptions of them); `slip.data.loader.collate` sums them. Caption
choice and augmentation are a pure function of (seed, epoch, item), and leave the caller's global random
generators as they were.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from slip.data.decode import MAX_BAD_IN_A_ROW, BadSample, SkipLog
from slip.data.seeding import derive_seed, seeded_global_rngs
from slip.data.sources.base import Source, check_index

__all__ = ["ImageTextDataset", "Transform", "transform_sample"]

Transform = Callable[[Image.Image, str], Mapping[str, Tensor]]
"""Maps (RGB image, caption) to named tensors, e.g. {"image": [3,H,W], "text": [L], "aug1": ...}."""


def transform_sample(transform: Transform, image: Image.Image, captions: Sequence[str], seed: int) -> dict[str, Any]:
    """Pick one caption and apply `transform`, all randomness drawn from `seed`."""
    rng = random.Random(seed)
    caption = captions[rng.randrange(len(captions))]
    with seeded_global_rngs(rng.getrandbits(63)):
        sample = transform(image, caption)
    if not isinstance(sample, Mapping):
        raise TypeError(f"the transform must return a mapping of tensors, got {type(sample).__name__}")
    return dict(sample)


class ImageTextDataset(torch.utils.data.Dataset):
    """Training samples from a source: one caption drawn per call, `transform` applied, bad samples replaced.

    When record `index` is bad, records ``index + k * stride`` (mod length, k = 1, 2, ...) are tried in turn,
    at most `max_retries` times, so every call returns a sample and batches keep their size. Caption choice
    and augmentation depend only on (seed, epoch, index); set the epoch with `set_epoch` before iterating.
    """

    _STRIDE = 1_000_003  # prime: replacements spread over the dataset instead of hitting a bad neighbourhood

    def __init__(self, source: Source, transform: Transform, seed: int = 0,
                 max_retries: int = MAX_BAD_IN_A_ROW) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if len(source) == 0:
            raise ValueError(f"the source {type(source).__name__} has no records")
        self.source, self.transform, self.seed, self.max_retries = source, transform, seed, max_retries
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of `epoch` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of records of the source."""
        return len(self.source)

    def candidate(self, index: int, attempt: int) -> int:
        """The record tried for `index` at `attempt` (0: itself, then its deterministic replacements)."""
        length = len(self.source)
        return (index + attempt * (self._STRIDE % length or 1)) % length

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Transform output of record `index` (or of its replacement) plus "_skipped"/"_skipped_examples"."""
        index = check_index(index, len(self), self)
        log = SkipLog(self.max_retries)
        for attempt in range(self.max_retries + 1):
            try:
                image, captions = self.source.load(self.candidate(index, attempt))
            except BadSample as error:
                log.add(error)
                continue
            seed = derive_seed(self.seed, self.epoch, index, attempt)
            return {**transform_sample(self.transform, image, captions, seed), **log.take()}
        raise AssertionError("unreachable: SkipLog raises after max_retries + 1 bad samples")
