"""The one way in from `slip.train`: the `data` config node to a training loader per epoch and its step count."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, IterableDataset

from slip.app.config import ConfigError, build
from slip.data.dataset import ImageTextDataset, Transform
from slip.data.decode import MAX_BAD_IN_A_ROW
from slip.checks import non_negative_int, positive_int
from slip.data.loader import batches_per_epoch, build_train_loader
from slip.distributed import WorldInfo

__all__ = ["DataSettings", "TrainData", "build_train_data", "plan_train_data"]


@dataclass(frozen=True)
class DataSettings:
    """The `data` config node: samples from a map-style `source` or a `stream`, batched per rank.

    `source` and `stream` stay config nodes here (built by `build_train_data`): a source is any `Source`, a stream
    an IterableDataset that takes `transform` and `seed` (e.g. `slip.data.webdataset.WebDatasetStream`).
    """

    batch_size: int
    num_workers: int = 0
    source: Any = None
    stream: Any = None

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        non_negative_int("num_workers", self.num_workers)
        if (self.source is None) == (self.stream is None):
            raise ValueError("set exactly one of source (map-style records) and stream (e.g. WebDataset shards)")


@dataclass(frozen=True)
class TrainData:
    """Training data planned for a run: the dataset, its batching and the optimizer steps of an epoch."""

    dataset: Dataset | IterableDataset
    batch_size: int
    num_workers: int
    world: WorldInfo
    seed: int
    steps_per_epoch: int
    pin_memory: bool = False
    summary: str = ""  # what was read, for the run header: "1,000 images, 3,000 captions (grouped by image)"

    @property
    def global_batch(self) -> int:
        """Samples per micro-step over all ranks."""
        return self.batch_size * self.world.world_size

    def loader(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """This rank's loader of `epoch`, after the `start_batch` batches already consumed (a resume position)."""
        return build_train_loader(self.dataset, self.batch_size, self.world, num_workers=self.num_workers,
                                  seed=self.seed, epoch=epoch, start_batch=start_batch, pin_memory=self.pin_memory)


def build_train_data(data_cfg: DictConfig, transform: Transform, world: WorldInfo, seed: int, update_freq: int = 1,
                     pin_memory: bool = False, max_bad_in_a_row: int = MAX_BAD_IN_A_ROW) -> TrainData:
    """Check and build the `data` node: its source or stream with `transform`, and the optimizer steps per epoch
    at `update_freq` batches per step; errors name the key. Its readers give up after more than `max_bad_in_a_row`
    bad samples in a row (`trainer.max_bad_in_a_row`)."""
    settings: DataSettings = build(data_cfg, "data", _recursive_=False)
    if settings.stream is not None:
        dataset = build(settings.stream, "data.stream", transform=transform, seed=seed,
                        max_bad_in_a_row=max_bad_in_a_row)
        if getattr(dataset, "samples_per_epoch", None) is None:
            raise ConfigError("data.stream.samples_per_epoch: required to plan the epochs of a stream")
        summary = f"a stream of {dataset.samples_per_epoch:,} samples per epoch"
    else:
        source = build(settings.source, "data.source")
        describe = getattr(source, "summary", None)  # e.g. CsvSource: images and captions read
        summary = describe() if callable(describe) else f"{len(source):,} records"
        dataset = ImageTextDataset(source, transform, seed=seed, max_retries=max_bad_in_a_row)
    plan = plan_train_data(dataset, settings.batch_size, settings.num_workers, world, seed, update_freq, pin_memory)
    return replace(plan, summary=summary)


def plan_train_data(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int, world: WorldInfo,
                    seed: int, update_freq: int = 1, pin_memory: bool = False) -> TrainData:
    """`dataset` batched per rank, with its optimizer steps per epoch at `update_freq` batches per step; a
    one-line ConfigError naming data.batch_size where an epoch holds no whole step."""
    batches = batches_per_epoch(dataset, batch_size, world, num_workers)
    if batches // update_freq < 1:
        raise ConfigError(f"data.batch_size: {batch_size} x {world.world_size} processes x update_freq "
                          f"{update_freq} needs at least that many samples per epoch; the data gives each rank "
                          f"{batches} batches")
    return TrainData(dataset, batch_size, num_workers, world, seed, batches // update_freq, pin_memory)
