"""WebDataset tar shards (as img2dataset writes them) read as a stream of training samples.

Reading only: which shards a (rank, worker) reader takes, how many samples it yields, and where a resumed epoch
starts are `slip.data.loader`'s arithmetic (`StreamPlan`).
"""
from __future__ import annotations

import glob
import json
import os
import posixpath
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from slip.data.dataset import Transform, transform_sample
from slip.data.decode import DEFAULT_MAX_PIXELS, MAX_BAD_IN_A_ROW, BadSample, SkipLog, check_caption, decode_image
from slip.data.loader import ReaderShare, StreamPlan, shard_order
from slip.data.seeding import derive_seed
from slip.distributed import WorldInfo

__all__ = ["IMAGE_EXTENSIONS", "WebDatasetStream", "brace_expand", "expand_urls"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members, in order of preference
_MAX_MEMBER_BYTES = 256 << 20  # tar members above this are not read into memory
_TAR_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, "txt", "json"})


def brace_expand(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a{1,2}`` -> a1, a2; ``s-{000..003}`` -> s-000 .. s-003 (zero-padded).

    Ranges may descend and take a step (``{10..0..5}``); braces nest. ``{}`` and ``{x}`` stay literal.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in {pattern!r}")
        return [pattern]
    if "}" in pattern[:start]:
        raise ValueError(f"unbalanced '}}' in {pattern!r}")
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in {pattern!r}")
    head, body, tails = pattern[:start], pattern[start + 1 : end], brace_expand(pattern[end + 1 :])
    alternatives = _brace_range(body, pattern)
    if alternatives is None:
        parts = _split_top_level(body)
        if len(parts) < 2:  # no comma: literal braces, as in bash
            return [head + "{" + middle + "}" + tail for middle in brace_expand(body) for tail in tails]
        alternatives = [expanded for part in parts for expanded in brace_expand(part)]
    return [head + middle + tail for middle in alternatives for tail in tails]


def _brace_range(body: str, pattern: str) -> list[str] | None:
    """The items of a numeric range body like ``000..009`` or ``1..9..2``; None if `body` is no range."""
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    step = abs(int(match[3] or 1))
    if step == 0:
        raise ValueError(f"zero step in brace range {{{body}}} of {pattern!r}")
    padded = any(len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0") for text in match.group(1, 2))
    width = max(len(match[1]), len(match[2])) if padded else 0
    values = range(first, last + 1, step) if first <= last else range(first, last - 1, -step)
    return [f"{value:0{width}d}" for value in values]


def _split_top_level(body: str) -> list[str]:
    """Split a brace body at the commas that are not inside nested braces."""
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Local shard paths from a path, a brace pattern, a glob, or a list of those; all must exist."""
    patterns = [urls] if isinstance(urls, str) else [str(url) for url in urls]
    paths: list[str] = []
    for pattern in patterns:
        for expanded in brace_expand(os.path.expanduser(pattern)):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise ValueError(f"no shard matches {expanded!r}")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"no shards in {urls!r}")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} shards do not exist, first: {missing[0]}")
    return paths


def _read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) groups of consecutive members sharing a key from the tar at `url`.

    The key is the member path up to the first dot of its file name (WebDataset's convention); only image,
    .txt and .json members are read. Raises BadSample("broken_shard") when the tar turns out damaged, after
    the groups before the damage have been yielded.
    """
    key, group = None, {}
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, name = posixpath.split(member.name)
                stem, _, extension = name.partition(".")
                member_key = posixpath.join(directory, stem)
                if member_key != key:
                    if group:
                        yield key, group
                    key, group = member_key, {}
                extension = extension.lower()
                if extension not in _TAR_EXTENSIONS:
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    group["_too_large"] = f"{extension}: {member.size} bytes".encode()
                    continue
                group[extension] = tar.extractfile(member).read()
    except FileNotFoundError:
        raise BadSample("missing", url) from None
    # Damaged or non-tar files fail in tarfile, zlib, bz2, lzma or the OS: each means a broken shard.
    except Exception as error:  # noqa: BLE001
        raise BadSample("broken_shard", url, f"{type(error).__name__}: {error}") from None
    if group:
        yield key, group


def _decode_group(group: Mapping[str, bytes], where: str, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """The RGB image and caption of one WebDataset sample; raises BadSample."""
    if "_too_large" in group:
        raise BadSample("too_large", where, group["_too_large"].decode())
    if "txt" in group:
        caption = check_caption(group["txt"], f"{where}.txt")
    elif "json" in group:
        try:
            metadata = json.loads(group["json"])
        except UnicodeDecodeError as error:
            detail = f"invalid UTF-8 at byte {error.start}"
            raise BadSample("bad_caption_encoding", f"{where}.json", detail) from None
        except ValueError as error:
            raise BadSample("corrupt", f"{where}.json", str(error)) from None
        if not isinstance(metadata, Mapping) or "caption" not in metadata:
            raise BadSample("missing", f"{where}.json", "no 'caption' field")
        caption = check_caption(metadata["caption"], f"{where}.json")
    else:
        raise BadSample("missing", where, "no .txt or .json caption member")
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in group), None)
    if extension is None:
        raise BadSample("missing", where, f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    return decode_image(group[extension], f"{where}.{extension}", max_pixels), [caption]


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream approximately, through a buffer of `size` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class WebDatasetStream(torch.utils.data.IterableDataset):
    """Samples from WebDataset tar shards as img2dataset writes them.

    Members are grouped by key (path up to the first dot of the file name); the image is the .jpg, .jpeg,
    .png or .webp member, the caption the .txt member or else the "caption" field of the .json member.

    `urls`: a path, a brace pattern (``shards/{00000..00099}.tar``), a glob, or a list of those.

    Shards are split over (rank, DataLoader worker) readers, rank-major (`slip.data.loader.shard_order`). With
    ``resample=False`` each epoch visits every shard exactly once across all readers (shard order shuffled per
    epoch), and a reader without a shard is an error. With ``resample=True`` every reader draws shards with
    replacement from all of them, seeded by (seed, epoch, rank, worker), endlessly unless `samples_per_epoch`
    is set.

    `samples_per_epoch` (all ranks together) makes every reader yield exactly its equal share, rounded down to
    whole batches (`slip.data.loader.StreamPlan`), so every rank sees the same number of batches (DDP needs
    that); a reader that runs out of shards first starts over on its own shards. It also gives the stream a length, and allows resuming
    mid-epoch (`configure(start_batch=...)`), which skips raw samples without decoding them: exact unless
    the skipped part held bad samples. Without it, ranks may see different numbers of batches: set it for
    distributed training. Broken shards and bad samples are skipped and counted; more than
    `max_bad_in_a_row` in a row raise an error instead of spinning forever.
    `slip.data.loader.build_train_loader` calls `set_epoch` and `configure`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Transform,
        seed: int = 0,
        resample: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 0,
        max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_urls(urls)
        self.transform, self.seed, self.resample = transform, seed, resample
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.max_bad_in_a_row, self.max_pixels = max_bad_in_a_row, max_pixels
        self.epoch = 0
        self.plan = StreamPlan(samples_per_epoch=samples_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the shard order and random draws of `epoch` from now on."""
        self.epoch = epoch

    def configure(
        self, world: WorldInfo, num_workers: int = 0, batch_size: int = 1, start_batch: int = 0
    ) -> None:
        """Say how the stream is read: by which rank, with how many DataLoader workers, in which batch size,
        and how many batches of this epoch were already consumed (resuming needs `samples_per_epoch`)."""
        plan = StreamPlan(world, num_workers, batch_size, start_batch, self.samples_per_epoch)
        plan.check(len(self.urls), self.resample)
        self.plan = plan

    def __len__(self) -> int:
        """Samples this rank still yields this epoch (needs samples_per_epoch)."""
        if self.samples_per_epoch is None:
            raise TypeError("a WebDatasetStream without samples_per_epoch has no length")
        return self.plan.remaining_samples()

    def _groups(self, share: ReaderShare, log: SkipLog) -> Iterator[tuple[tuple[Any, ...], str, dict[str, bytes]]]:
        """(seed parts, where, member group) of every sample of this reader's shards; logs broken shards."""
        visits: Counter[int] = Counter()
        for shard in shard_order(len(self.urls), share, self.plan, self.resample, self.seed, self.epoch):
            url, visit = self.urls[shard], visits[shard]
            visits[shard] += 1
            empty = True
            try:
                for key, group in _read_shard(url):
                    empty = False
                    yield (self.seed, self.epoch, shard, visit, key), f"{url}:{key}", group
            except BadSample as error:
                log.add(error)
            else:
                if empty:  # counted so that a stream of empty shards ends in an error, not an endless loop
                    log.add(BadSample("empty_shard", url))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Transformed samples of this rank and worker, each with "_skipped"/"_skipped_examples"."""
        info = torch.utils.data.get_worker_info()
        share = self.plan.reader(*((info.id, info.num_workers) if info is not None else (0, 1)))
        log = SkipLog(self.max_bad_in_a_row)
        groups = self._groups(share, log)
        if self.shuffle_buffer:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.plan.world.rank, share.role, "buffer"))
            groups = _shuffled(groups, self.shuffle_buffer, rng)
        if share.quota == 0:
            return
        produced, to_skip = 0, share.to_skip
        for seed_parts, where, group in groups:
            if to_skip:
                to_skip -= 1
            else:
                try:
                    image, captions = _decode_group(group, where, self.max_pixels)
                except BadSample as error:
                    log.add(error)
                    continue
                yield {**transform_sample(self.transform, image, captions, derive_seed(*seed_parts)), **log.take()}
            produced += 1
            if produced == share.quota:
                return
