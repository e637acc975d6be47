"""Batching and every piece of sharding arithmetic: batches per epoch, ranks, workers, stream shares, resumes.

Training loaders are built once per epoch: `build_train_loader(..., epoch=e)` sets the dataset's epoch before
any worker starts, so caption draws and augmentations are those of epoch `e`. To resume mid-epoch, pass the
number of batches already consumed as `start_batch`; the loader then yields exactly the remaining batches of
an uninterrupted epoch, without loading the skipped samples (map-style datasets). Map-style datasets are split
over ranks by `EpochSampler`; streams read the share a `StreamPlan` gives each (rank, worker) reader.
"""
from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from slip.checks import non_negative_int, positive_int
from slip.data.decode import MAX_SKIPPED_EXAMPLES
from slip.data.seeding import derive_seed
from slip.distributed import WorldInfo

__all__ = ["EpochSampler", "ReaderShare", "StreamPlan", "batch_rows", "batch_to_device", "batches_per_epoch",
           "build_eval_loader", "build_train_loader", "collate", "shard_order"]


def _is_named_tuple(value: Any) -> bool:
    """A named tuple (such as a deferred view: pixels and operations), collated field by field."""
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def batch_to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with its tensors on `device` (asynchronous copies from pinned memory); other entries as they are."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def batch_rows(batch: Mapping[str, Any]) -> int:
    """The number of samples in a collated batch (the rows of its first tensor or named tuple of tensors)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
        if _is_named_tuple(value):
            return value[0].shape[0]
    raise ValueError(f"batch has no tensor entries: keys {sorted(batch)}")


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts: stack tensors (named tuples of tensors field by field), sum "_skipped" counts,
    concatenate (a few) "_skipped_examples"."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = samples[0].keys()
    for position, sample in enumerate(samples):
        if sample.keys() != keys:
            raise ValueError(f"sample {position} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if key == "_skipped":
            batch[key] = dict(sum((Counter(value) for value in values), Counter()))
        elif key == "_skipped_examples":
            batch[key] = [example for value in values for example in value][:MAX_SKIPPED_EXAMPLES]
        elif isinstance(values[0], torch.Tensor) or _is_named_tuple(values[0]):
            try:
                # default_collate stacks straight into shared memory inside a worker, saving a copy per batch.
                batch[key] = default_collate(values)
            except RuntimeError:
                shapes = sorted({tuple(value.shape) if isinstance(value, torch.Tensor) else
                                 tuple(tuple(field.shape) for field in value) for value in values})
                raise ValueError(f"cannot stack {key!r}: samples have shapes {shapes}") from None
        elif isinstance(values[0], (int, float, bool)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class EpochSampler(Sampler[int]):
    """This rank's indices of a per-(seed, epoch) permutation; every rank gets the same count.

    The permutation's first ``num_samples // world_size * world_size`` entries are dealt out round-robin
    (rank r takes positions r, r + world_size, ...); the tail is dropped. `start_index` skips the first
    indices of this rank's share, e.g. those already consumed before a resume.
    """

    def __init__(
        self,
        num_samples: int,
        world: WorldInfo = WorldInfo(),
        seed: int = 0,
        epoch: int = 0,
        start_index: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_samples < world.world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world.world_size} ranks")
        self.num_samples, self.world, self.seed, self.shuffle = num_samples, world, seed, shuffle
        self.per_rank = num_samples // world.world_size
        self.set_epoch(epoch, start_index)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Use the permutation of `epoch`, starting `start_index` indices into this rank's share."""
        if not 0 <= start_index <= self.per_rank:
            raise ValueError(f"start_index must be in [0, {self.per_rank}], got {start_index}")
        self.epoch, self.start_index = epoch, start_index

    def __len__(self) -> int:
        """Indices still to come this epoch."""
        return self.per_rank - self.start_index

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining indices of the epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        size = self.world.world_size
        mine = order[: self.per_rank * size][self.world.rank :: size]
        return iter(mine[self.start_index :].tolist())


@dataclass(frozen=True)
class ReaderShare:
    """What one DataLoader worker of one rank reads of a stream this epoch."""

    role: int  # the worker position whose shards and random draws this worker takes (see StreamPlan.reader)
    slot: int  # this reader among all (rank, worker) readers, rank-major
    slots: int
    quota: int | None  # samples it yields, or None: until its shards run out
    to_skip: int  # raw samples it passes over first (batches consumed before a resume)


@dataclass(frozen=True)
class StreamPlan:
    """How one rank reads a stream in an epoch: its world, DataLoader workers, batch size, batches already consumed.

    With `samples_per_epoch` (all ranks together) every (rank, worker) reader yields exactly its equal share,
    rounded down to whole batches, so every rank sees the same number of batches (DDP needs that).
    """

    world: WorldInfo = WorldInfo()
    num_workers: int = 0
    batch_size: int = 1
    start_batch: int = 0
    samples_per_epoch: int | None = None

    @property
    def workers(self) -> int:
        """Readers per rank (the main process reads when there are no workers)."""
        return max(1, self.num_workers)

    def quota(self, workers: int | None = None) -> int | None:
        """Samples each reader yields per epoch (None without samples_per_epoch)."""
        if self.samples_per_epoch is None:
            return None
        share = self.samples_per_epoch // (self.world.world_size * (workers or self.workers))
        return share // self.batch_size * self.batch_size

    def batches(self) -> int:
        """Batches this rank gets in a whole epoch."""
        quota = self.quota()
        if quota is None:
            raise TypeError("a stream without samples_per_epoch has no length")
        return self.workers * quota // self.batch_size

    def remaining_samples(self) -> int:
        """Samples this rank still yields this epoch, after `start_batch` batches."""
        return max(0, (self.batches() - self.start_batch) * self.batch_size)

    def too_few_shards(self, shards: int, workers: int | None = None) -> str:
        """The error message for fewer shards than (rank, worker) readers."""
        workers = workers or self.workers
        return (f"{shards} shards cannot feed {self.world.world_size * workers} readers ({self.world.world_size} "
                f"ranks x {workers} workers); use fewer workers, more shards, or resample=True")

    def check(self, shards: int, resample: bool) -> None:
        """Raise a one-line ValueError where this plan cannot be read from `shards` shards."""
        if not resample and shards < self.world.world_size * self.workers:
            raise ValueError(self.too_few_shards(shards))
        if self.samples_per_epoch is None:
            if self.start_batch:
                raise ValueError("resuming a stream mid-epoch (start_batch > 0) needs samples_per_epoch")
            return
        if self.quota() == 0:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is less than one batch per reader: "
                f"{self.world.world_size} ranks x {self.workers} workers x batch_size {self.batch_size}"
            )
        if self.start_batch > self.batches():
            raise ValueError(f"start_batch={self.start_batch} is past the {self.batches()} batches of an epoch")

    def reader(self, worker: int, num_workers: int) -> ReaderShare:
        """The share of DataLoader worker `worker` of `num_workers` (as the running loader reports them)."""
        if self.samples_per_epoch is not None and num_workers != self.workers:
            raise RuntimeError(f"stream configured for {self.workers} workers but runs in {num_workers}: "
                               "call configure() with the DataLoader's num_workers")
        # A resumed DataLoader asks worker 0 first, but batch `start_batch` came from worker start_batch % n:
        # workers take over the roles (shards, seeds) of the workers that would be next in line.
        role = (worker + self.start_batch) % num_workers
        # Role r delivered batches r, r + num_workers, ... of the epoch: skip those already consumed.
        to_skip = max(0, -(-(self.start_batch - role) // num_workers)) * self.batch_size
        return ReaderShare(role, self.world.rank * num_workers + role, self.world.world_size * num_workers,
                           self.quota(num_workers), to_skip)


def shard_order(shards: int, share: ReaderShare, plan: StreamPlan, resample: bool, seed: int,
                epoch: int) -> Iterator[int]:
    """Indices of the shards a reader reads, in order.

    Without `resample` each epoch deals a per-epoch shuffle of all shards out to the readers (every shard once
    across them; endlessly again from the start when the plan has a quota). With `resample` each reader draws
    shards with replacement, seeded by (seed, epoch, rank, role), endlessly.
    """
    if resample:
        rng = random.Random(derive_seed(seed, epoch, plan.world.rank, share.role))
        while True:
            yield rng.randrange(shards)
    order = list(range(shards))
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    mine = order[share.slot :: share.slots]
    if not mine:
        raise ValueError(plan.too_few_shards(shards, share.slots // plan.world.world_size))
    while True:
        yield from mine
        if share.quota is None:
            return


def batches_per_epoch(dataset: Dataset | IterableDataset, batch_size: int, world: WorldInfo,
                      num_workers: int = 0) -> int:
    """Batches each rank gets in a whole epoch of `dataset` (a stream needs its samples_per_epoch)."""
    positive_int("batch_size", batch_size)
    if isinstance(dataset, IterableDataset):
        return StreamPlan(world, num_workers, batch_size, 0, getattr(dataset, "samples_per_epoch", None)).batches()
    return len(dataset) // world.world_size // batch_size


def build_train_loader(
    dataset: Dataset | IterableDataset,
    batch_size: int,
    world: WorldInfo,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """The training DataLoader of one epoch: `batch_size` samples per rank, incomplete batches dropped.

    Map-style datasets are shuffled by an `EpochSampler` (seeded by `seed`, `epoch`) and sharded over ranks;
    streams (IterableDataset) shard and shuffle themselves (see `WebDatasetStream`) and `seed` is not used.
    The loader skips the first `start_batch` batches of the epoch. `persistent_workers` keeps workers (and
    their copy of the dataset) alive between iterations, so only use it to iterate the same epoch again.
    """
    positive_int("batch_size", batch_size)
    non_negative_int("num_workers", num_workers)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = None
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "configure"):
            dataset.configure(world, num_workers, batch_size, start_batch)
        elif start_batch:
            raise ValueError(f"{type(dataset).__name__} cannot skip batches (start_batch={start_batch})")
    else:
        size, global_batch = len(dataset), batch_size * world.world_size
        if size < global_batch:
            raise ValueError(
                f"dataset of {size} samples is smaller than one global batch of {global_batch} "
                f"(batch_size {batch_size} x world_size {world.world_size})"
            )
        batches = batches_per_epoch(dataset, batch_size, world)
        if start_batch > batches:
            raise ValueError(f"start_batch={start_batch} is past the {batches} batches of an epoch")
        sampler = EpochSampler(size, world, seed, epoch, start_index=start_batch * batch_size)
    return _data_loader(dataset, batch_size, num_workers, pin_memory, derive_seed(seed, epoch, world.rank, "loader"),
                        sampler=sampler, drop_last=True, worker_init_fn=ignore_sigterm,
                        persistent_workers=persistent_workers and num_workers > 0)


def _data_loader(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int, pin_memory: bool,
                 generator_seed: int, **options: Any) -> DataLoader:
    """A DataLoader of our collated batches, with a generator of its own: the workers' base seed would otherwise
    be drawn from the caller's global RNG."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(generator_seed), **options)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGTERM to the main process.

    SLURM preemption and `kill` of a process group signal the workers too; a worker that died of it would
    crash the main process before it could save. Workers still exit when the loader is shut down or the
    main process ends.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_eval_loader(
    dataset: Dataset | IterableDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A plain evaluation DataLoader: every sample once, in order, last batch kept even if smaller."""
    positive_int("batch_size", batch_size)
    non_negative_int("num_workers", num_workers)
    return _data_loader(dataset, batch_size, num_workers, pin_memory, 0, shuffle=False, drop_last=False)
