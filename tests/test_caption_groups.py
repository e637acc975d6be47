"""CsvSource.group_by_image: the caption rows of one image are one record, so a batch never holds an image twice."""
from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import caption_of, tiny_transform, write_image, write_shard
from omegaconf import OmegaConf

from slip.app.config import ConfigError
from slip.app.train_data import build_train_data
from slip.data.sources import CsvSource
from slip.distributed import WorldInfo

IMAGES, ROWS_PER_IMAGE, BATCH, EPOCHS = 40, 3, 8, 6


def write_captions_csv(root: Path, images: int = IMAGES, rows_per_image: int = ROWS_PER_IMAGE) -> Path:
    """A CSV of `rows_per_image` caption rows ("img7 caption 2") for each of `images` generated PNGs.

    The rows of an image are spread over the file (row r names image r % images), as in files sorted by caption.
    """
    for k in range(images):
        write_image(root / "images" / f"img{k}.png", (k * 6 % 256, 255 - k * 6 % 256, 90))
    rows = [f"images/img{r % images}.png,img{r % images} caption {r // images}" for r in range(images * rows_per_image)]
    path = root / "pairs.csv"
    path.write_text("filepath,title\n" + "\n".join(rows) + "\n")
    return path


def csv_node(path: Path, **source: object) -> dict:
    return {"_target_": "slip.app.train_data.DataSettings", "batch_size": BATCH, "num_workers": 0,
            "source": {"_target_": "slip.data.sources.CsvSource", "path": str(path), **source}}


def images_per_batch(node: dict, epochs: int = EPOCHS) -> list[list[str]]:
    """The image of every sample (read back from its caption) of each training batch of `epochs` epochs."""
    data = build_train_data(OmegaConf.create(node), tiny_transform, WorldInfo(), seed=0)
    return [[caption_of(text).split()[0] for text in batch["text"]]
            for epoch in range(epochs) for batch in data.loader(epoch=epoch)]


def duplicates(batches: list[list[str]]) -> list[int]:
    """Per batch, the samples whose image is already in the batch."""
    return [len(names) - len(set(names)) for names in batches]


def test_the_caption_rows_of_an_image_are_one_record_in_order_of_first_appearance(tmp_path: Path) -> None:
    source = CsvSource(str(write_captions_csv(tmp_path)))
    assert len(source) == IMAGES and source.grouped_by_image
    assert (source.num_images, source.num_captions) == (IMAGES, IMAGES * ROWS_PER_IMAGE)
    assert [Path(source.image_path(k)).name for k in range(IMAGES)] == [f"img{k}.png" for k in range(IMAGES)]
    image, captions = source.load(7)
    assert captions == [f"img7 caption {j}" for j in range(ROWS_PER_IMAGE)]
    assert image.getpixel((0, 0)) == (42, 213, 90)
    assert source.summary() == "40 images, 120 captions (grouped by image)"


def test_paths_naming_one_file_are_one_image_and_a_bad_caption_row_leaves_the_others(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,first\nb.png,other\n./a.png,  \nsub/../a.png,third\n")
    source = CsvSource(str(tmp_path / "pairs.csv"))
    assert len(source) == 2 and (source.num_images, source.num_captions) == (2, 4)
    assert source.captions(0) == ["first", "third"] and source.captions(1) == ["other"]


def test_a_batch_never_holds_the_same_image_twice_when_grouped(tmp_path: Path) -> None:
    path = write_captions_csv(tmp_path)
    per_row = duplicates(images_per_batch(csv_node(path, group_by_image=False)))
    grouped = duplicates(images_per_batch(csv_node(path)))  # group_by_image: null (auto) groups this file
    print(f"duplicates per batch of {BATCH} over {EPOCHS} epochs: before {sum(per_row) / len(per_row):.2f} "
          f"({sum(per_row)} in {len(per_row)} batches), after {sum(grouped) / len(grouped):.2f} "
          f"({sum(grouped)} in {len(grouped)} batches)")
    assert len(per_row) == EPOCHS * IMAGES * ROWS_PER_IMAGE // BATCH and sum(per_row) > 0
    assert len(grouped) == EPOCHS * IMAGES // BATCH and not any(grouped)


def test_an_epoch_visits_each_image_once_with_one_of_its_captions_drawn(tmp_path: Path) -> None:
    data = build_train_data(OmegaConf.create(csv_node(write_captions_csv(tmp_path))), tiny_transform, WorldInfo(),
                            seed=0)
    drawn: dict[str, set[str]] = {}
    for epoch in range(EPOCHS):
        captions = [caption_of(text) for batch in data.loader(epoch=epoch) for text in batch["text"]]
        assert sorted(caption.split()[0] for caption in captions) == sorted(f"img{k}" for k in range(IMAGES))
        for caption in captions:
            drawn.setdefault(caption.split()[0], set()).add(caption)
    assert all(caption.startswith(f"{image} caption ") for image, seen in drawn.items() for caption in seen)
    assert sum(len(seen) > 1 for seen in drawn.values()) >= 35  # 3 captions, 6 visits: nearly every image varies


def test_auto_keeps_a_file_without_repeated_paths_one_record_per_row(tmp_path: Path) -> None:
    path = write_captions_csv(tmp_path, rows_per_image=1)
    source = CsvSource(str(path))
    assert len(source) == IMAGES and not source.grouped_by_image
    assert source.summary() == "40 images, 40 captions (one record per row)"
    forced = CsvSource(str(path), group_by_image=True)
    assert forced.grouped_by_image and [forced.captions(k) for k in range(IMAGES)] == [
        source.captions(k) for k in range(IMAGES)]
    per_row = CsvSource(str(write_captions_csv(tmp_path / "three")), group_by_image=False)
    assert len(per_row) == IMAGES * ROWS_PER_IMAGE and (per_row.num_images, per_row.num_captions) == (40, 120)


@pytest.mark.parametrize("value", ["yes", 2])
def test_a_bad_group_by_image_stops_with_one_line_naming_the_key(tmp_path: Path, value: object) -> None:
    node = csv_node(write_captions_csv(tmp_path, images=2), group_by_image=value)
    with pytest.raises(ConfigError, match=r"^data\.source\.group_by_image: ") as info:
        build_train_data(OmegaConf.create(node), tiny_transform, WorldInfo(), seed=0)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^group_by_image must be true, false or null"):
        CsvSource(str(tmp_path / "pairs.csv"), group_by_image=value)  # type: ignore[arg-type]


def test_the_run_header_says_what_was_read(tmp_path: Path) -> None:
    from train_helpers import compose_config

    cfg = compose_config("data=csv", f"data.source.path={write_captions_csv(tmp_path)}", "data.batch_size=8")
    assert cfg.data.source.group_by_image is None  # the shipped default: auto
    data = build_train_data(cfg.data, tiny_transform, WorldInfo(), seed=0)
    assert data.summary == "40 images, 120 captions (grouped by image)" and data.steps_per_epoch == IMAGES // 8
    synthetic = {"_target_": "slip.app.train_data.DataSettings", "batch_size": 4,
                 "source": {"_target_": "slip.data.synthetic.SyntheticShapes", "num_samples": 12, "image_size": 16}}
    assert build_train_data(OmegaConf.create(synthetic), tiny_transform, WorldInfo(), seed=0).summary == "12 records"
    stream = {"_target_": "slip.app.train_data.DataSettings", "batch_size": 2,
              "stream": {"_target_": "slip.data.webdataset.WebDatasetStream", "samples_per_epoch": 1200,
                         "urls": [str(write_shard(tmp_path / "0.tar", ["a", "b"]))], "resample": True}}
    summary = build_train_data(OmegaConf.create(stream), tiny_transform, WorldInfo(), seed=0).summary
    assert summary == "a stream of 1,200 samples per epoch"


def test_a_run_saved_before_grouping_existed_does_not_continue_grouped_without_saying_so(tmp_path: Path) -> None:
    """Its CSV rows were one record each: today's default (group when paths repeat) would change the data, so the
    resume stops naming the key; with group_by_image=false it continues."""
    from omegaconf import OmegaConf

    from slip.app.config import ConfigError
    from slip.app.migrations import fill_added_defaults, upgrade_saved_config
    from slip.app.run_identity import check_resume
    from train_helpers import compose_config

    current = compose_config("data=csv", "data.source.path=/data/pairs.csv", "run_name=test")
    saved = OmegaConf.create(OmegaConf.to_container(current, resolve=True))
    del saved.data.source["group_by_image"]  # as a config written before the key existed
    upgraded = upgrade_saved_config(saved)
    fill_added_defaults(upgraded, current)
    with pytest.raises(ConfigError, match=r"^data\.source\.group_by_image: differs from the checkpoint"):
        check_resume(upgraded, current, 1, 1, None, tmp_path / "last.pt")
    check_resume(upgraded, compose_config("data=csv", "data.source.path=/data/pairs.csv", "run_name=test",
                                          "data.source.group_by_image=false"), 1, 1, None, tmp_path / "last.pt")
