"""collate, EpochSampler and the loader builders: sharding, resume, workers, bad data."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import caption_of, tiny_transform, write_image, write_shard

from slip.data.dataset import ImageTextDataset
from slip.data.sources import CsvSource
from slip.data.webdataset import WebDatasetStream
from slip.data.loader import EpochSampler, build_eval_loader, build_train_loader, collate
from slip.data.tensor_views import DeferredView
from slip.distributed import WorldInfo

SINGLE = WorldInfo()


def _csv_dataset(tmp_path: Path, size: int, bad: dict[int, str] | None = None) -> ImageTextDataset:
    """A CsvSource-backed dataset of `size` rows; rows in `bad` are broken in the named way."""
    bad = bad or {}
    rows = ["filepath,title"]
    for i in range(size):
        name = f"img{i}.png"
        if bad.get(i) == "corrupt":
            (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        elif bad.get(i) == "zero":
            (tmp_path / name).write_bytes(b"")
        elif bad.get(i) != "missing":
            write_image(tmp_path / name, (i * 9 % 256, 100, 50))
        rows.append(f"{name},{'  ' if bad.get(i) == 'empty' else f'row {i}'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return ImageTextDataset(CsvSource(str(tmp_path / "data.csv")), tiny_transform)


def _batches(loader) -> list[dict]:
    return list(loader)


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in ("image", "text", "aug1"):
            assert torch.equal(a[key], b[key]), key
        assert a["_skipped"] == b["_skipped"]


# --- collate -----------------------------------------------------------------------------------------------


def test_collate_stacks_and_merges_skip_counts():
    samples = [
        {"image": torch.full((3, 2, 2), float(i)), "text": torch.arange(4) + i, "_skipped": skipped,
         "_skipped_examples": examples}
        for i, (skipped, examples) in enumerate([
            ({"corrupt": 2}, ["a", "b"]),
            ({}, []),
            ({"corrupt": 1, "missing": 3}, ["c", "d", "e", "f"]),
        ])
    ]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 2, 2) and torch.equal(batch["image"][2], samples[2]["image"])
    assert batch["text"].dtype == torch.long and batch["text"].shape == (3, 4)
    assert batch["_skipped"] == {"corrupt": 3, "missing": 3}
    assert batch["_skipped_examples"] == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="sample 1 has keys"):
        collate([{"image": torch.zeros(1)}, {"text": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"cannot stack 'image': samples have shapes \[\(1,\), \(2,\)\]"):
        collate([{"image": torch.zeros(1)}, {"image": torch.zeros(2)}])
    views = [DeferredView(torch.full((3, 2, 2), row, dtype=torch.uint8), torch.full((11,), float(row)))
             for row in range(3)]
    stacked = collate([{"aug1": view} for view in views])["aug1"]
    assert isinstance(stacked, DeferredView) and stacked.pixels.shape == (3, 3, 2, 2)
    assert torch.equal(stacked.operations[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cannot stack 'aug1': samples have shapes \[\(\(3, 2, 2\), \(0,\)\), "):
        collate([{"aug1": views[0]}, {"aug1": DeferredView(views[1].pixels, torch.empty(0))}])


class _Samples(torch.utils.data.Dataset):
    """Sample dicts whose image is filled with its index."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((3, 4, 4), float(index)), "text": torch.arange(5) + index}


def _collate_and_report_sharing(samples: list[dict]) -> dict:
    """`collate`, plus whether its image batch was born in shared memory (seen inside the worker)."""
    batch = collate(samples)
    return {**batch, "born_shared": batch["image"].is_shared(), "stacked": torch.stack([s["image"] for s in samples])}


def test_collate_in_a_worker_stacks_straight_into_shared_memory():
    loader = torch.utils.data.DataLoader(_Samples(), batch_size=4, num_workers=1,
                                         collate_fn=_collate_and_report_sharing)
    for batch in loader:
        assert batch["born_shared"]  # no private copy made first and copied to shared memory afterwards
        assert torch.equal(batch["image"], batch["stacked"])
        assert batch["text"].shape == (4, 5)
    assert not collate([_Samples()[0], _Samples()[1]])["image"].is_shared()  # in the main process: plain memory


# --- EpochSampler ------------------------------------------------------------------------------------------


def test_sampler_gives_disjoint_equal_rank_shards():
    shards = [list(EpochSampler(103, WorldInfo(rank, 4), seed=5, epoch=2)) for rank in range(4)]
    assert [len(shard) for shard in shards] == [25] * 4
    flat = [index for shard in shards for index in shard]
    assert len(set(flat)) == 100 and all(0 <= index < 103 for index in flat)
    assert shards[0] == list(EpochSampler(103, WorldInfo(0, 4), seed=5, epoch=2))
    assert shards[0] != list(EpochSampler(103, WorldInfo(0, 4), seed=5, epoch=3))
    assert shards[0] != list(EpochSampler(103, WorldInfo(0, 4), seed=6, epoch=2))
    sampler = EpochSampler(103, WorldInfo(0, 4), seed=5, epoch=0, start_index=10)
    sampler.set_epoch(2, start_index=10)
    assert list(sampler) == shards[0][10:] and len(sampler) == 15
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="start_index must be in"):
        sampler.set_epoch(0, start_index=26)


# --- build_train_loader ------------------------------------------------------------------------------------


def test_resume_yields_exactly_the_remaining_batches(tmp_path):
    dataset = _csv_dataset(tmp_path, 22, bad={4: "corrupt"})
    world = WorldInfo(1, 2)
    full = _batches(build_train_loader(dataset, 3, world, seed=7, epoch=1))
    assert len(full) == 3  # 22 // 2 ranks = 11 per rank = 3 batches of 3
    for start in range(4):
        loader = build_train_loader(dataset, 3, world, seed=7, epoch=1, start_batch=start)
        assert len(loader) == 3 - start
        _assert_same_batches(_batches(loader), full[start:])
    with pytest.raises(ValueError, match="start_batch=4 is past the 3 batches"):
        build_train_loader(dataset, 3, world, seed=7, epoch=1, start_batch=4)
    other_epoch = _batches(build_train_loader(dataset, 3, world, seed=7, epoch=2))
    assert not torch.equal(other_epoch[0]["aug1"], full[0]["aug1"])


def test_train_loader_argument_errors(tmp_path):
    dataset = _csv_dataset(tmp_path, 6)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad}"):
            build_train_loader(dataset, bad, SINGLE)
    with pytest.raises(ValueError, match=r"dataset of 6 samples is smaller than one global batch of 8 "
                                         r"\(batch_size 4 x world_size 2\)"):
        build_train_loader(dataset, 4, WorldInfo(0, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        build_eval_loader(dataset, 0)


def test_workers_finish_over_bad_data_and_report_every_bad_sample(tmp_path):
    bad = {1: "corrupt", 5: "zero", 6: "missing", 11: "empty", 14: "corrupt"}
    dataset = _csv_dataset(tmp_path, 16, bad=bad)
    # Every index of the epoch is loaded once (16 = 4 batches of 4); walk each replacement chain.
    expected = 0
    for index in range(16):
        attempt = 0
        while dataset.candidate(index, attempt) in bad:
            expected, attempt = expected + 1, attempt + 1
    assert expected >= len(bad)
    serial = _batches(build_train_loader(dataset, 4, SINGLE, num_workers=0, seed=1))
    parallel = _batches(build_train_loader(dataset, 4, SINGLE, num_workers=2, seed=1))
    for batches in (serial, parallel):
        assert len(batches) == 4 and all(batch["image"].shape[0] == 4 for batch in batches)
        assert sum(sum(batch["_skipped"].values()) for batch in batches) == expected
        kinds = set().union(*(batch["_skipped"] for batch in batches))
        assert kinds == {"corrupt", "empty_file", "missing", "empty_caption"}
    _assert_same_batches(serial, parallel)  # augmentations do not depend on the worker layout


def test_loader_leaves_global_rngs_alone(tmp_path):
    dataset = _csv_dataset(tmp_path, 8)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    _batches(build_train_loader(dataset, 2, SINGLE))
    assert torch.equal(torch.rand(2), expected[0]) and (random.random(), np.random.rand()) == expected[1:]


def test_eval_loader_is_in_order_and_keeps_the_last_batch(tmp_path):
    dataset = _csv_dataset(tmp_path, 7)
    batches = _batches(build_eval_loader(dataset, 3))
    assert [batch["text"].shape[0] for batch in batches] == [3, 3, 1]
    captions = [caption_of(text) for batch in batches for text in batch["text"]]
    assert captions == [f"row {i}" for i in range(7)]


# --- streams -----------------------------------------------------------------------------------------------


def test_stream_loader_has_equal_batches_per_rank_and_resumes(tmp_path):
    urls = [str(write_shard(tmp_path / f"s{s}.tar", [f"s{s}k{k}" for k in range(3 + s)])) for s in range(4)]
    stream = WebDatasetStream(urls, tiny_transform, samples_per_epoch=24)
    lengths = []
    for rank in range(2):
        loader = build_train_loader(stream, 2, WorldInfo(rank, 2), num_workers=2, epoch=3)
        batches = _batches(loader)
        lengths.append(len(batches))
        assert len(loader) == len(batches) and all(batch["text"].shape[0] == 2 for batch in batches)
    assert lengths == [6, 6]
    full = _batches(build_train_loader(stream, 2, WorldInfo(1, 2), num_workers=2, epoch=3))
    for start in (1, 2, 5):  # resuming on either worker's turn
        loader = build_train_loader(stream, 2, WorldInfo(1, 2), num_workers=2, epoch=3, start_batch=start)
        assert len(loader) == 6 - start
        _assert_same_batches(_batches(loader), full[start:])
    plain = WebDatasetStream(urls, tiny_transform)
    with pytest.raises(ValueError, match="needs samples_per_epoch"):
        build_train_loader(plain, 2, SINGLE, start_batch=1)
