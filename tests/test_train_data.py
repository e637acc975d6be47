"""slip.data.build_train_data: the `data` node checked once, map-style or stream, and the batch arithmetic of an
epoch equal to what the loaders of every rank deliver."""
from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import tiny_transform, write_shard, write_tar
from omegaconf import OmegaConf

from slip.app.config import ConfigError
from slip.app.migrations import check_renamed_overrides, upgrade_saved_config
from slip.app.train_data import DataSettings, build_train_data
from slip.data.decode import DataError
from slip.distributed import WorldInfo


def synthetic_node(num_samples: int, batch_size: int, num_workers: int = 0) -> dict:
    return {"_target_": "slip.app.train_data.DataSettings", "batch_size": batch_size, "num_workers": num_workers,
            "source": {"_target_": "slip.data.synthetic.SyntheticShapes", "num_samples": num_samples,
                       "image_size": 16}}


def stream_node(urls: list[str], samples_per_epoch: int | None, batch_size: int, num_workers: int) -> dict:
    return {"_target_": "slip.app.train_data.DataSettings", "batch_size": batch_size, "num_workers": num_workers,
            "stream": {"_target_": "slip.data.webdataset.WebDatasetStream", "urls": urls,
                       "samples_per_epoch": samples_per_epoch, "resample": True}}


def delivered_batches(node: dict, world: WorldInfo, update_freq: int = 1) -> tuple[int, int]:
    """(steps_per_epoch as planned, batches this rank's loader of epoch 0 yields)."""
    data = build_train_data(OmegaConf.create(node), tiny_transform, world, seed=0, update_freq=update_freq)
    return data.steps_per_epoch, sum(1 for _ in data.loader(epoch=0))


@pytest.mark.parametrize(("world_size", "update_freq"), [(1, 1), (2, 1), (3, 2)])
def test_map_style_steps_per_epoch_match_the_batches_each_rank_gets(world_size: int, update_freq: int) -> None:
    for rank in range(world_size):
        steps, batches = delivered_batches(synthetic_node(50, 4), WorldInfo(rank, world_size), update_freq)
        assert batches == 50 // world_size // 4 and steps == batches // update_freq


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2), (3, 1)])
def test_stream_steps_per_epoch_match_the_batches_each_rank_gets(tmp_path: Path, world_size: int,
                                                                  num_workers: int) -> None:
    urls = [str(write_shard(tmp_path / f"{index}.tar", [f"s{index}_{k}" for k in range(5)])) for index in range(3)]
    for rank in range(world_size):
        steps, batches = delivered_batches(stream_node(urls, 61, 3, num_workers), WorldInfo(rank, world_size))
        assert steps == batches > 0


def test_a_stream_without_samples_per_epoch_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    urls = [str(write_shard(tmp_path / "0.tar", ["a", "b"]))]
    with pytest.raises(ConfigError, match=r"^data\.stream\.samples_per_epoch: required"):
        build_train_data(OmegaConf.create(stream_node(urls, None, 1, 0)), tiny_transform, WorldInfo(), seed=0)


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_size": 0}, r"^data\.batch_size: batch_size must be a positive integer, got 0$"),
    ({"num_workers": -2}, r"^data\.num_workers: num_workers must be >= 0, got -2$"),
    ({"num_workers": "two"}, r"^data\.num_workers: expected int, got 'two'$"),
    ({"source": None}, r"^data\.source: set exactly one of source .* and stream"),
    ({"stream": {"_target_": "slip.data.webdataset.WebDatasetStream"}}, r"^data\.source: set exactly one of source"),
    ({"batch": 4}, r"^data\.batch: unknown key for slip\.app\.train_data\.DataSettings"),
    ({"batch_size": 40}, r"^data\.batch_size: 40 x 2 processes x update_freq 1 needs at least"),
])
def test_the_data_node_is_checked_once_with_the_key_named(change: dict, message: str) -> None:
    node = {**synthetic_node(64, 4), **change}
    with pytest.raises(ConfigError, match=message):
        build_train_data(OmegaConf.create(node), tiny_transform, WorldInfo(0, 2), seed=0)


def test_data_settings_take_plain_values() -> None:
    settings = DataSettings(batch_size=8, num_workers=2, source={"_target_": "x"})
    assert (settings.batch_size, settings.num_workers, settings.stream) == (8, 2, None)


def test_renamed_overrides_name_the_new_key() -> None:
    for override in ("augment.ssl_scale=[0.2,1]", "+augment.ssl_scale=[0.2,1]", "~augment.ssl_scale"):
        with pytest.raises(ConfigError, match=r"^augment\.ssl_scale: renamed to augment\.ssl_crop_scale"):
            check_renamed_overrides([override])
    check_renamed_overrides(["loss.ssl_scale=0.5", "augment.ssl_crop_scale=[0.2,1]"])


def test_a_config_saved_before_the_data_builder_reads_in_todays_layout() -> None:
    saved = OmegaConf.create({
        "data": {"source": {"_target_": "slip.data.datasets.CsvSource", "path": "p.csv"}, "batch_size": 8,
                 "num_workers": 0},
        "augment": {"_target_": "slip.data.transforms.build_multiview", "ssl_scale": [0.08, 1.0]},
        "loss": {"_target_": "slip.losses.SLIPLoss", "ssl_scale": 1.0},
    })
    upgraded = upgrade_saved_config(saved)
    assert upgraded.data._target_ == "slip.app.train_data.DataSettings"
    assert upgraded.data.source._target_ == "slip.data.sources.CsvSource"
    assert "ssl_scale" not in upgraded.augment and list(upgraded.augment.ssl_crop_scale) == [0.08, 1.0]
    assert upgraded.loss.ssl_scale == 1.0 and "_target_" not in saved.data  # the loss weight and the input stay


def test_trainer_max_bad_in_a_row_is_the_limit_of_map_style_and_stream_readers(tmp_path: Path) -> None:
    from train_helpers import FAST, compose_config

    from slip.app.config import build

    settings = build(compose_config(*FAST, "trainer.max_bad_in_a_row=2").trainer, "trainer")
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,title\n" + "".join(f"missing{i}.png,a caption\n" for i in range(8)))
    csv_node = {"_target_": "slip.app.train_data.DataSettings", "batch_size": 2,
                "source": {"_target_": "slip.data.sources.CsvSource", "path": str(table)}}
    stream = stream_node([str(write_tar(tmp_path / "empty.tar", []))], 8, 2, 0)
    for node, kind in [(csv_node, "missing"), (stream, "empty_shard")]:
        data = build_train_data(OmegaConf.create(node), tiny_transform, WorldInfo(), seed=0,
                                max_bad_in_a_row=settings.max_bad_in_a_row)
        with pytest.raises(DataError, match=f"^3 bad samples in a row.*{kind}"):
            next(iter(data.loader(epoch=0)))
