"""Readers, image decoding, caption checks, ImageTextDataset and WebDatasetStream, on tiny generated data."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    caption_of,
    image_bytes,
    png_claiming_size,
    tiny_transform,
    write_image,
    write_shard,
    write_tar,
)
from PIL import Image

from slip.data.dataset import ImageTextDataset
from slip.data.decode import BadSample, check_caption, decode_image, read_image_file
from slip.data.sources import CocoCaptionsSource, ConceptualCaptionsSource, CsvSource, RedCapsSource, YFCC15MSource
from slip.data.webdataset import WebDatasetStream, brace_expand, expand_urls
from slip.distributed import WorldInfo

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def _kind(call) -> str:
    """The BadSample kind raised by `call()`."""
    with pytest.raises(BadSample) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value.kind


class ListSource:
    """A source over in-memory records; an Exception instance in place of an image means "bad"."""

    def __init__(self, records: list[tuple[object, list[str]]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        image, captions = self.records[index]
        if isinstance(image, BadSample):
            raise image
        return image, captions


# --- images --------------------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise_image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_modes_become_rgb_with_alpha_on_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    cases = {
        "CMYK": (_encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), None),
        "P": (_encoded(palette, "PNG"), ((1, 1), (0, 0, 255))),
        "P+transparency": (_encoded(palette, "PNG", transparency=1), ((1, 1), (255, 255, 255))),
        "I;16": (_encoded(Image.fromarray(np.full((4, 4), 25600, np.uint16)), "PNG"), ((0, 0), (100,) * 3)),
        "RGBA": (_encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG"), ((0, 0), (255, 255, 255))),
        "LA": (_encoded(Image.new("LA", (4, 4), (40, 255)), "PNG"), ((0, 0), (40, 40, 40))),
        "1": (_encoded(Image.new("1", (4, 4), 1), "PNG"), ((0, 0), (255, 255, 255))),
        "F": (_encoded(Image.new("F", (4, 4), 300.0), "TIFF"), ((0, 0), (255, 255, 255))),
    }
    for name, (data, expected) in cases.items():
        image = decode_image(data, name)
        assert image.mode == "RGB", name
        if expected is not None:
            assert image.getpixel(expected[0]) == expected[1], name
    red = decode_image(cases["CMYK"][0], "CMYK").getpixel((0, 0))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_bad_images_raise_bad_sample(tmp_path):
    png = _encoded(_noise_image(), "PNG")
    jpeg = _encoded(_noise_image(), "JPEG")
    assert _kind(lambda: decode_image(b"", "zero")) == "empty_file"
    assert _kind(lambda: decode_image(png[: len(png) // 2], "truncated.png")) == "corrupt"
    assert _kind(lambda: decode_image(jpeg[: len(jpeg) // 2], "truncated.jpg")) == "corrupt"
    assert _kind(lambda: decode_image(jpeg[:2] + os.urandom(300), "garbage.jpg")) == "corrupt"
    assert _kind(lambda: decode_image(b"not an image at all", "text.jpg")) == "corrupt"
    # Far above Pillow's own hard limit, and above a small per-call limit.
    bomb = png_claiming_size(100_000, 100_000)
    assert _kind(lambda: decode_image(bomb, "bomb.png")) == "decompression_bomb"
    assert _kind(lambda: decode_image(png, "big.png", max_pixels=64 * 64 - 1)) == "decompression_bomb"
    assert decode_image(png, "ok.png", max_pixels=64 * 64).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global is left alone
    assert _kind(lambda: read_image_file(str(tmp_path / "nope.jpg"))) == "missing"
    with pytest.raises(BadSample, match="nope.jpg"):
        read_image_file(str(tmp_path / "nope.jpg"))


def test_bad_sample_is_one_line_and_picklable():
    error = BadSample("corrupt", "a/b.jpg", "line one\nline two")
    assert str(error) == "corrupt: a/b.jpg (line one line two)"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.where, str(copy)) == ("corrupt", "a/b.jpg", str(error))


def test_check_caption():
    assert check_caption("a dog " * 10_000, "w").startswith("a dog")  # long is fine: the tokenizer truncates
    assert check_caption("café".encode(), "w") == "café"
    assert _kind(lambda: check_caption(b"caf\xe9", "w")) == "bad_caption_encoding"
    assert _kind(lambda: check_caption("caf\udce9", "w")) == "bad_caption_encoding"
    assert _kind(lambda: check_caption(" \t\n", "w")) == "empty_caption"
    assert _kind(lambda: check_caption("", "w")) == "empty_caption"
    assert _kind(lambda: check_caption(None, "w")) == "empty_caption"


# --- map-style sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".csv", ".tsv"])
def test_csv_source(tmp_path, extension):
    write_image(tmp_path / "images" / "a.png", RED)
    write_image(tmp_path / "images" / "b.png", GREEN)
    sep = "\t" if extension == ".tsv" else ","
    rows = ["filepath" + sep + "title", f"images/a.png{sep}a red square", f"images/b.png{sep}a green square"]
    path = tmp_path / f"list{extension}"
    path.write_text("\n".join(rows) + "\n")
    source = CsvSource(str(path))
    assert len(source) == 2
    image, captions = source.load(1)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == GREEN and captions == ["a green square"]
    clone = pickle.loads(pickle.dumps(ImageTextDataset(source, tiny_transform)))  # spawn/forkserver workers
    assert caption_of(clone[1]["text"]) == "a green square"


def test_csv_source_bad_column_and_separator(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("path,caption\nx.png,hello\n")
    with pytest.raises(ValueError) as info:
        CsvSource(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "'filepath'" in message and "'path', 'caption'" in message
    assert len(CsvSource(str(path), image_column="path", caption_column="caption")) == 1
    other = tmp_path / "list.txt"
    other.write_text("filepath,title\n")
    with pytest.raises(ValueError, match="list.txt.*pass sep"):
        CsvSource(str(other))
    assert len(CsvSource(str(other), sep=",")) == 0


def test_csv_source_bad_rows_are_per_record(tmp_path):
    write_image(tmp_path / "ok.png")
    (tmp_path / "zero.png").write_bytes(b"")
    path = tmp_path / "list.csv"
    path.write_bytes(
        b"filepath,title\n"
        b"ok.png,fine\n"
        b"ok.png,caf\xe9 latin-1\n"
        b"ok.png,   \n"
        b"zero.png,zero bytes\n"
        b"gone.png,missing\n"
        b"ok.png\n"
    )
    source = CsvSource(str(path), group_by_image=False)  # one record per row, though ok.png repeats
    assert source.load(0)[1] == ["fine"]
    kinds = [_kind(lambda i=i: source.load(i)) for i in range(1, 6)]
    assert kinds == ["bad_caption_encoding", "empty_caption", "empty_file", "missing", "empty_caption"]


def test_csv_fields_longer_than_the_csv_module_default_are_read(tmp_path):
    write_image(tmp_path / "ok.png")
    caption = "word " * 100_000  # 500,000 characters; Python's csv module stops at 131,072 by default
    path = tmp_path / "list.csv"
    path.write_text(f"filepath,title\nok.png,{caption}\nok.png,short\n")
    default_limit = csv.field_size_limit()
    source = CsvSource(str(path), group_by_image=False)
    assert [source.load(i)[1] for i in range(2)] == [[caption], ["short"]]
    assert csv.field_size_limit() == default_limit  # the process-wide setting is restored


def test_coco_source(tmp_path):
    write_image(tmp_path / "train2017" / "000000000001.jpg", RED, fmt="JPEG")
    write_image(tmp_path / "train2017" / "000000000002.jpg", BLUE, fmt="JPEG")
    annotations = [
        {"image_id": 2, "id": 10, "caption": "blue one"},
        {"image_id": 1, "id": 11, "caption": "red one"},
        {"image_id": 2, "id": 12, "caption": "blue two"},
    ]
    images = [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    source = CocoCaptionsSource(str(path), str(tmp_path / "train2017"))
    assert len(source) == 2
    image, captions = source.load(0)
    assert captions == ["blue one", "blue two"] and image.getpixel((0, 0))[2] > 150
    # Without an images list, file names follow SLIP's {id:012d}.jpg.
    path.write_text(json.dumps({"annotations": annotations}))
    assert CocoCaptionsSource(str(path), str(tmp_path / "train2017")).load(1)[1] == ["red one"]
    path.write_text(json.dumps({"images": images[:1], "annotations": annotations}))
    with pytest.raises(ValueError, match="captions.json.*image_id 2"):
        CocoCaptionsSource(str(path), str(tmp_path))
    path.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"captions.json: annotations\[0\] has no 'caption'"):
        CocoCaptionsSource(str(path), str(tmp_path))


def test_conceptual_captions_sources(tmp_path):
    write_image(tmp_path / "cc3m" / "1510438788", RED, fmt="JPEG")
    cc3m = np.array([{"image_id": 1510438788, "captions": ["tulips", "a field"]}], dtype=object)
    np.save(tmp_path / "cc3m.npy", cc3m, allow_pickle=True)
    image, captions = ConceptualCaptionsSource(str(tmp_path / "cc3m.npy"), str(tmp_path / "cc3m")).load(0)
    assert captions == ["tulips", "a field"] and image.mode == "RGB"

    write_image(tmp_path / "cc12m" / "0.jpg", GREEN, fmt="JPEG")
    cc12m = np.array(
        [
            {"image_name": "0.jpg", "image_id": 0, "captions": ["chairs"]},
            {"image_name": "1.jpg", "image_id": 1, "captions": ["gone"]},
        ],
        dtype=object,
    )
    np.save(tmp_path / "cc12m.npy", cc12m, allow_pickle=True)
    source = ConceptualCaptionsSource(str(tmp_path / "cc12m.npy"), str(tmp_path / "cc12m"))
    assert len(source) == 2 and source.load(0)[1] == ["chairs"]
    assert _kind(lambda: source.load(1)) == "missing"
    np.save(tmp_path / "bad.npy", np.array([{"captions": ["x"]}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="bad.npy: entry 0 has no 'image_id'"):
        ConceptualCaptionsSource(str(tmp_path / "bad.npy"), str(tmp_path))


def test_redcaps_source(tmp_path):
    write_image(tmp_path / "images" / "pics" / "abc.jpg", BLUE, fmt="JPEG")
    annotations = [{"image_id": "abc", "subreddit": "pics", "caption": "a blue thing"}]
    (tmp_path / "combined.json").write_text(json.dumps(annotations))
    (tmp_path / "pics.json").write_text(json.dumps({"info": {}, "annotations": annotations}))
    for name in ("combined.json", "pics.json"):
        source = RedCapsSource(str(tmp_path / name), str(tmp_path / "images"))
        image, captions = source.load(0)
        assert len(source) == 1 and captions == ["a blue thing"] and image.size == (8, 6)


def test_yfcc15m_source(tmp_path):
    root = tmp_path / "yfcc100m" / "images"
    (root / "12").mkdir(parents=True)
    with zipfile.ZipFile(root / "12" / "345.zip", "w") as archive:
        archive.writestr("678.jpg", image_bytes(RED, fmt="JPEG"))
        archive.writestr("679.jpg", b"\xff\xd8 not really a jpeg")
    (root / "00").mkdir()
    (root / "00" / "000.zip").write_bytes(b"PK not a zip")
    records = [
        (12345678, "a title", "a description"),
        (12345678, "", "only a description"),
        (12345678, "  ", ""),
        (12345679, "corrupt", ""),
        (12345680, "not in the zip", ""),
        (99999999, "no such zip", ""),
        (0, "broken zip", ""),
    ]
    with open(tmp_path / "yfcc15m.pkl", "wb") as file:
        pickle.dump(records, file)
    source = YFCC15MSource(str(tmp_path / "yfcc15m.pkl"), str(root))
    assert YFCC15MSource.locate(12345678) == ("12/345.zip", "678.jpg")
    assert YFCC15MSource.locate(42) == ("00/000.zip", "042.jpg")
    image, captions = source.load(0)
    assert captions == ["a title", "a description"] and image.getpixel((0, 0))[0] > 150
    assert source.load(1)[1] == ["only a description"]
    kinds = [_kind(lambda i=i: source.load(i)) for i in range(2, 7)]
    assert kinds == ["empty_caption", "corrupt", "missing", "missing", "corrupt"]
    clone = pickle.loads(pickle.dumps(source))  # open zip handles are not pickled
    assert clone.load(1)[1] == ["only a description"]


# --- ImageTextDataset --------------------------------------------------------------------------------------


def _multi_caption_dataset(seed: int = 0) -> ImageTextDataset:
    captions = [f"caption {j}" for j in range(6)]
    records = [(Image.new("RGB", (8, 8), (i * 20, 0, 0)), captions) for i in range(8)]
    return ImageTextDataset(ListSource(records), tiny_transform, seed=seed)


def test_caption_and_augmentation_depend_only_on_seed_epoch_index():
    dataset, twin = _multi_caption_dataset(), _multi_caption_dataset()
    twin_order = [5, 0, 3, 7, 1, 2, 6, 4]
    twin_samples = {index: twin[index] for index in twin_order}  # other order, other object
    for index in range(8):
        sample = dataset[index]
        assert caption_of(sample["text"]) == caption_of(twin_samples[index]["text"])
        assert torch.equal(sample["image"], twin_samples[index]["image"])
        assert torch.equal(sample["aug1"], twin_samples[index]["aug1"])
        assert sample["_skipped"] == {} and sample["_skipped_examples"] == []
    picks = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        picks.add(caption_of(dataset[0]["text"]))
    assert len(picks) > 1  # a fresh caption draw each epoch
    dataset.set_epoch(0)
    other_seed = _multi_caption_dataset(seed=1)
    assert any(not torch.equal(dataset[i]["aug1"], other_seed[i]["aug1"]) for i in range(8))


def test_dataset_leaves_global_rngs_alone():
    dataset = _multi_caption_dataset()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    for index in range(4):
        dataset[index]
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_bad_samples_are_replaced_and_counted():
    good = Image.new("RGB", (8, 8), GREEN)
    records = [(good, [f"good {i}"]) for i in range(10)]
    records[3] = (BadSample("corrupt", "three.jpg"), ["x"])
    records[3 + 1_000_003 % 10] = (BadSample("missing", "six.jpg"), ["x"])
    dataset = ImageTextDataset(ListSource(records), tiny_transform)
    sample = dataset[3]
    assert sample["_skipped"] == {"corrupt": 1, "missing": 1}
    assert sample["_skipped_examples"] == ["corrupt: three.jpg", "missing: six.jpg"]
    assert caption_of(sample["text"]) == f"good {dataset.candidate(3, 2)}"
    assert dataset[0]["_skipped"] == {}


def test_all_bad_source_raises_one_line_error():
    records = [(BadSample("corrupt", f"{i}.jpg"), ["x"]) for i in range(5)]
    dataset = ImageTextDataset(ListSource(records), tiny_transform, max_retries=3)
    with pytest.raises(RuntimeError, match=r"^4 bad samples in a row") as info:
        dataset[0]
    assert "\n" not in str(info.value)


# --- WebDataset -------------------------------------------------------------------------------------------


def test_brace_expand():
    assert brace_expand("shard-{000..003}.tar") == [f"shard-{i:03d}.tar" for i in range(4)]
    assert brace_expand("s{8..11}") == ["s8", "s9", "s10", "s11"]
    assert brace_expand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert brace_expand("x{a,b{0..1}}y") == ["xay", "xb0y", "xb1y"]
    assert brace_expand("{3..1}") == ["3", "2", "1"]
    assert brace_expand("{00..10..5}") == ["00", "05", "10"]
    assert brace_expand("plain.tar") == ["plain.tar"]
    for bad in ("a{1..2", "a}b", "{0..4..0}"):
        with pytest.raises(ValueError, match="a\\{1..2|a}b|0..4..0"):
            brace_expand(bad)


def test_expand_urls(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"shard-{i:02d}.tar", [f"k{i}"])
    expected = [str(tmp_path / f"shard-{i:02d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "shard-{00..02}.tar")) == expected
    assert expand_urls(str(tmp_path / "shard-*.tar")) == expected
    assert expand_urls(expected[::-1]) == expected[::-1]
    with pytest.raises(ValueError, match=r"1 of 4 shards do not exist, first: .*shard-03.tar"):
        expand_urls(str(tmp_path / "shard-{00..03}.tar"))
    with pytest.raises(ValueError, match="no shard matches"):
        expand_urls(str(tmp_path / "*.tgz"))


def _keys(samples) -> list[str]:
    return [caption_of(sample["text"]).removeprefix("caption of ") for sample in samples]


def test_stream_skips_broken_shard_in_the_middle(tmp_path):
    first = write_shard(tmp_path / "s0.tar", ["a0", "a1"])
    middle = write_shard(tmp_path / "s1.tar", ["b0", "b1", "b2"], color=RED)
    last = write_shard(tmp_path / "s2.tar", ["c0", "c1"])
    data = middle.read_bytes()  # 512-byte blocks: header, b0.png, header, b0.txt, header, b1.png, ...
    stream = WebDatasetStream([str(first), str(middle), str(last)], tiny_transform)
    middle.write_bytes(data[: 512 * 3 + 5])  # cut inside b0's caption
    samples = list(stream)
    assert sorted(_keys(samples)) == ["a0", "a1", "c0", "c1"]
    assert sum(sample["_skipped"].get("broken_shard", 0) for sample in samples) == 1
    middle.write_bytes(data[: 512 * 5 + 100])  # cut inside b1's image: b0 before the damage is kept
    samples = list(stream)
    assert sorted(_keys(samples)) == ["a0", "a1", "b0", "c0", "c1"]
    assert sum(sample["_skipped"].get("broken_shard", 0) for sample in samples) == 1
    middle.write_bytes(os.urandom(3000))  # garbage instead of a tar
    samples = list(stream)
    assert sorted(_keys(samples)) == ["a0", "a1", "c0", "c1"]
    assert sum(sample["_skipped"].get("broken_shard", 0) for sample in samples) == 1


def test_stream_members_and_bad_samples(tmp_path):
    jpeg = image_bytes(GREEN, fmt="JPEG")
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("dir/x.jpg", jpeg),
            ("dir/x.json", json.dumps({"caption": "from json", "url": "http://x"}).encode()),
            ("y.webp", image_bytes(BLUE, fmt="WEBP")),
            ("y.txt", b"a webp"),
            ("y.extra.npy", b"ignored"),
            ("no_image.txt", b"lonely caption"),
            ("bad_text.png", image_bytes()),
            ("bad_text.txt", b"\xff\xfe"),
            ("empty.png", image_bytes()),
            ("empty.txt", b"  "),
            ("corrupt.jpg", jpeg[:100]),
            ("corrupt.txt", b"cut"),
            ("bomb.png", png_claiming_size(50_000, 50_000)),
            ("bomb.txt", b"bomb"),
            ("z.png", image_bytes()),
            ("z.txt", b"last"),
        ],
    )
    samples = list(WebDatasetStream(str(shard), tiny_transform))
    assert [caption_of(sample["text"]) for sample in samples] == ["from json", "a webp", "last"]
    assert samples[2]["_skipped"] == {
        "missing": 1, "bad_caption_encoding": 1, "empty_caption": 1, "corrupt": 1, "decompression_bomb": 1
    }
    assert len(samples[2]["_skipped_examples"]) == 5
    assert "no_image" in samples[2]["_skipped_examples"][0]


def _make_shards(tmp_path: Path, count: int, per_shard: int) -> list[str]:
    return [
        str(write_shard(tmp_path / f"shard-{s}.tar", [f"s{s}k{k}" for k in range(per_shard)]))
        for s in range(count)
    ]


def _read_all(stream: WebDatasetStream, world: WorldInfo, num_workers: int) -> list[str]:
    stream.configure(world, num_workers)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return _keys(loader)


def test_shards_split_over_ranks_and_workers_exactly_once(tmp_path):
    urls = _make_shards(tmp_path, 5, 2)
    stream = WebDatasetStream(urls, tiny_transform, seed=3)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        keys = [key for rank in range(2) for key in _read_all(stream, WorldInfo(rank, 2), num_workers=2)]
        assert sorted(keys) == sorted(f"s{s}k{k}" for s in range(5) for k in range(2))
    with pytest.raises(ValueError, match=r"5 shards cannot feed 6 readers \(3 ranks x 2 workers\)"):
        stream.configure(WorldInfo(0, 3), num_workers=2)


def test_resampled_stream_has_equal_deterministic_epochs(tmp_path):
    urls = _make_shards(tmp_path, 3, 4)
    stream = WebDatasetStream(urls, tiny_transform, resample=True, samples_per_epoch=20, shuffle_buffer=3)
    stream.configure(WorldInfo(0, 2), batch_size=2)
    assert len(stream) == 10
    epoch0 = list(stream)
    assert len(epoch0) == 10 and _keys(epoch0) == _keys(list(stream))
    assert torch.equal(epoch0[0]["aug1"], next(iter(stream))["aug1"])
    stream.configure(WorldInfo(1, 2), batch_size=2)
    assert len(list(stream)) == 10
    stream.set_epoch(1)
    assert _keys(list(stream)) != _keys(epoch0)
    assert _keys(list(pickle.loads(pickle.dumps(stream)))) == _keys(list(stream))


def test_shuffle_buffer_permutes_and_quota_cycles(tmp_path):
    urls = _make_shards(tmp_path, 2, 5)
    plain = _keys(WebDatasetStream(urls, tiny_transform))
    shuffled = _keys(WebDatasetStream(urls, tiny_transform, shuffle_buffer=4))
    assert sorted(plain) == sorted(shuffled) and plain != shuffled
    looping = _keys(WebDatasetStream(urls, tiny_transform, samples_per_epoch=25))
    assert len(looping) == 25 and looping[:10] == plain and looping[10:20] == plain


def test_stream_of_unusable_shards_raises_instead_of_spinning(tmp_path):
    empty = write_tar(tmp_path / "empty.tar", [])
    stream = WebDatasetStream(str(empty), tiny_transform, resample=True, max_bad_in_a_row=5)
    with pytest.raises(RuntimeError, match="6 bad samples in a row.*empty_shard"):
        next(iter(stream))


def test_captions_are_read_without_the_image(tmp_path):
    (tmp_path / "pairs.csv").write_text("filepath,title\nnot_there.png,a red circle\nalso_gone.png,\n")
    source = CsvSource(str(tmp_path / "pairs.csv"))
    assert source.captions(0) == ["a red circle"] and source.captions(-2) == ["a red circle"]
    with pytest.raises(BadSample):
        source.captions(1)  # an empty caption is still a bad sample
    with pytest.raises(BadSample):
        source.load(0)  # the image itself is missing
