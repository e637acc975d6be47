"""Fault injection: bad data, kill -9 and full disks during saves (one rank of two included), non-finite losses,
fp16 gradient overflow, hostile checkpoints, bad configs.

One place that demonstrates every promise of the reliability issue. Where a point is already tested well
elsewhere, a comment names that test instead of repeating it:

- single bad images and captions (truncated/corrupt JPEG and PNG, zero bytes, decompression bombs, missing
  files, non-UTF-8 and blank captions) become counted BadSamples: test_datasets.py::test_bad_images_raise_bad_sample,
  ::test_csv_source_bad_rows_are_per_record, ::test_stream_members_and_bad_samples;
- CMYK, palette (with transparency), 16-bit and alpha images become RGB:
  test_datasets.py::test_modes_become_rgb_with_alpha_on_white;
- a broken tar shard in the middle of a stream: test_datasets.py::test_stream_skips_broken_shard_in_the_middle;
- DataLoader workers finish over bad data:
  test_loader.py::test_workers_finish_over_bad_data_and_report_every_bad_sample;
- too many bad samples stop the run naming examples:
  test_configs.py::test_too_many_bad_samples_stop_the_run_naming_examples;
- SIGTERM (to the whole process group) saves and exits resumably:
  test_train.py::test_sigterm_to_the_process_group_saves_and_exits_resumably; resuming such a stop is exact:
  test_train.py::test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run;
- a save that fails keeps the previous file: test_checkpoint.py::test_failed_save_keeps_previous_file;
- weights_only loading refuses a malicious pickle in load_pretrained:
  test_checkpoint.py::test_malicious_pickle_is_refused_and_never_runs;
  the original SLIP format (argparse Namespace) loads: ::test_original_slip_checkpoint; TorchScript archives
  load through the OpenAI-CLIP path only as tensors: ::test_openai_torchscript_archive;
- config validation (negative steps, batch 0, wrong types, unknown keys, unknown model):
  test_train.py::test_bad_values_fail_before_training_naming_the_key, ::test_command_line_errors_are_short.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_helpers import image_bytes, png_claiming_size, write_tar
from slip.checkpoint import CheckpointError, atomic_save, read_checkpoint
from slip.pretrained import load_pretrained
from slip.app.config import ConfigError
from slip.data.dataset import ImageTextDataset
from slip.data.sources import CsvSource
from slip.app.engine import TrainingError
from slip.losses import CLIPLoss
from slip.app.train import train
from train_helpers import FAST, compose_config, subprocess_env

# A model small enough that a training step and a checkpoint save take milliseconds on 2 cores.
SMALL = ["model.vision_width=32", "model.vision_layers=1", "model.vision_heads=1", "model.embed_dim=16",
         "model.text_width=32", "model.text_layers=1", "model.text_heads=1", "model.image_size=16",
         "model.context_length=16"]
NO_SYNTHETIC = [o for o in FAST if not o.startswith("data.source")]


# ---------------------------------------------------------------------------------------------------------
# Data faults: a whole run over ~5% bad samples of every kind


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def odd_but_valid_images() -> dict[str, bytes]:
    """Images in modes that must be converted to RGB and used, not skipped."""
    palette = Image.new("P", (12, 10), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    rgba = Image.new("RGBA", (12, 10), (10, 200, 30, 100))
    return {
        "cmyk.jpg": _encoded(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), "JPEG"),
        "palette.png": _encoded(palette, "PNG"),
        "palette_transparent.png": _encoded(palette, "PNG", transparency=0),
        "sixteen_bit.png": _encoded(Image.fromarray(np.full((10, 12), 40000, np.uint16)), "PNG"),
        "rgba.png": _encoded(rgba, "PNG"),
        "la.png": _encoded(Image.new("LA", (12, 10), (90, 30)), "PNG"),
        "plain.png": image_bytes(size=(12, 10)),
    }


# Many words: the tokenizer stops reading after the context length, so this is truncated, not skipped.
LONG_CAPTION = "a very long caption " * 50000  # 1,000,000 characters (Python's csv default limit is 131,072)


def write_faulty_csv(root: Path, rows: int = 200) -> tuple[Path, dict[str, int]]:
    """A CSV dataset of `rows` records, 5% of them bad in every way a record can be; returns it and the counts."""
    images = root / "images"
    for name, data in odd_but_valid_images().items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    jpeg, png = image_bytes(fmt="JPEG", size=(32, 32)), image_bytes(size=(32, 32))
    bad_files = {"truncated.jpg": jpeg[: len(jpeg) // 2], "truncated.png": png[: len(png) // 2],
                 "garbage.png": bytes(range(256)) * 4, "zero.jpg": b"", "bomb.png": png_claiming_size(60_000, 60_000)}
    for name, data in bad_files.items():
        (images / name).write_bytes(data)
    bad_rows = [  # (row bytes, kind it must be counted as)
        (b"images/truncated.jpg,cut jpeg", "corrupt"),
        (b"images/truncated.png,cut png", "corrupt"),
        (b"images/garbage.png,not an image", "corrupt"),
        (b"images/zero.jpg,zero bytes", "empty_file"),
        (b"images/bomb.png,tiny file claiming 3.6 gigapixels", "decompression_bomb"),
        (b"images/gone.png,file does not exist", "missing"),
        (b"images/also_gone.jpg,file does not exist either", "missing"),
        (b"images/plain.png,latin-1 caf\xe9", "bad_caption_encoding"),
        (b"images/plain.png,\xff\xfe\xfd", "bad_caption_encoding"),
        (b"images/plain.png,   ", "empty_caption"),
    ]
    good_names = sorted(odd_but_valid_images())
    lines, counts = [b"filepath,title"], Counter()
    bad_at = {7 + 20 * i: row for i, row in enumerate(bad_rows)}  # spread out: a bad row's replacement is good
    for index in range(rows):
        if index in bad_at:
            line, kind = bad_at[index]
            lines.append(line)
            counts[kind] += 1
        elif index % 50 == 3:
            lines.append(f"images/plain.png,{LONG_CAPTION}".encode())
        else:
            lines.append(f"images/{good_names[index % len(good_names)]},photo {index}".encode())
    path = root / "pairs.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert sum(counts.values()) == rows // 20
    return path, dict(counts)


def test_a_run_over_five_percent_bad_csv_records_completes_and_counts_them_by_kind(tmp_path: Path, capsys) -> None:
    path, planted = write_faulty_csv(tmp_path / "data")
    cfg = compose_config(*NO_SYNTHETIC, *SMALL, "data=csv", f"data.source.path={path}", "data.num_workers=1",
                         "data.source.group_by_image=false",  # one record per row: 200 rows, 10 of them bad
                         "trainer.max_steps=null", "trainer.epochs=1", "trainer.save_every=0",
                         "trainer.max_bad_fraction=0.1")
    # Every record is drawn once in the epoch; check that no bad record is replaced by another bad one, so
    # each is counted exactly once.
    dataset = ImageTextDataset(CsvSource(str(path), group_by_image=False), transform=lambda image, caption: {})
    bad = {i for i in range(len(dataset.source)) if i % 20 == 7}
    assert all(dataset.candidate(i, 1) not in bad for i in bad)
    results = train(cfg, tmp_path / "run")
    assert results["finished"] and results["step"] == 200 // 8
    assert results["skipped_samples"] == planted
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["skipped_samples"] == planted
    last_progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")][-1]
    assert f" skipped {sum(planted.values())} " in last_progress  # the running count, on the console


def test_a_run_stopped_by_bad_samples_writes_its_results_with_the_reason(tmp_path: Path) -> None:
    path, _ = write_faulty_csv(tmp_path / "data")
    cfg = compose_config(*NO_SYNTHETIC, *SMALL, "data=csv", f"data.source.path={path}", "trainer.max_steps=null",
                         "data.source.group_by_image=false",
                         "trainer.epochs=1", "trainer.save_every=5", "trainer.max_bad_fraction=0.01")
    with pytest.raises(TrainingError, match=r"samples were bad") as info:
        train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not saved["finished"] and saved["error"] == str(info.value)
    assert saved["step"] > saved["checkpoint_step"] > 0 and saved["checkpoint_step"] % 5 == 0
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state"]["step"] == saved["checkpoint_step"]
    assert sum(saved["skipped_samples"].values()) > 0


def write_faulty_shards(root: Path, batch_size: int) -> tuple[list[Path], dict[str, int], int]:
    """Four WebDataset shards with ~5% bad samples of every kind, one shard cut off in the middle.

    Every shard starts with `batch_size` good samples, so a reader that goes round once and then reads one
    more batch has counted every bad sample exactly once, whatever order it visits the shards in. Returns
    the shards, the planted bad counts and the number of good samples before the damage.
    """
    jpeg, png = image_bytes(fmt="JPEG", size=(32, 32)), image_bytes(size=(32, 32))
    odd = list(odd_but_valid_images().items())
    bad_samples = [  # (members, kind)
        ([("cut.jpg", jpeg[: len(jpeg) // 2]), ("cut.txt", b"cut jpeg")], "corrupt"),
        ([("junk.png", bytes(range(256)) * 4), ("junk.txt", b"not an image")], "corrupt"),
        ([("zero.png", b""), ("zero.txt", b"zero bytes")], "empty_file"),
        ([("bomb.png", png_claiming_size(60_000, 60_000)), ("bomb.txt", b"bomb")], "decompression_bomb"),
        ([("lonely.txt", b"a caption without an image")], "missing"),
        ([("mute.png", png)], "missing"),
        ([("latin.png", png), ("latin.txt", b"caf\xe9 cr\xe8me")], "bad_caption_encoding"),
        ([("blank.png", png), ("blank.txt", b" \n\t")], "empty_caption"),
    ]
    counts = Counter(kind for _, kind in bad_samples)
    good_per_shard = [56, 56, 12, 47]
    shards, good = [], 0
    for shard, count in enumerate(good_per_shard):
        members = []
        for k in range(count):
            name, data = odd[k % len(odd)]
            extension = name.rsplit(".", 1)[1]
            caption = LONG_CAPTION if k == 20 else f"shard {shard} photo {k}"
            members += [(f"s{shard}_{k:03d}.{extension}", data), (f"s{shard}_{k:03d}.txt", caption.encode())]
            if k >= batch_size and k % 10 == 0 and shard != 2 and bad_samples:  # bad ones in the middle
                members += [(f"s{shard}_{k:03d}_bad_{name}", data) for name, data in bad_samples.pop()[0]]
        shards.append(write_tar(root / f"{shard:03d}.tar", members))
        good += count
    assert not bad_samples
    # Cut shard 2 inside the image of its 10th sample: the 9 before the damage are read, the rest are lost.
    with tarfile.open(shards[2]) as tar:
        image = next(member for member in tar.getmembers() if member.name.startswith("s2_009."))
    shards[2].write_bytes(shards[2].read_bytes()[: image.offset_data + image.size // 2])
    good -= good_per_shard[2] - 9
    counts["broken_shard"] = 1
    assert good % batch_size == 0
    return shards, dict(counts), good


def test_a_run_over_five_percent_bad_webdataset_samples_completes_and_counts_them_by_kind(tmp_path: Path) -> None:
    batch_size = 8
    shards, planted, good = write_faulty_shards(tmp_path / "shards", batch_size)
    assert 0.04 < sum(planted.values()) / (good + sum(planted.values())) < 0.06
    # One round over all shards plus one batch (see write_faulty_shards), no shuffle buffer, no resampling.
    urls = f"data.stream.urls='{tmp_path}/shards/{{000..003}}.tar'"
    cfg = compose_config(*NO_SYNTHETIC, *SMALL, "data=webdataset", urls,
                         f"data.stream.samples_per_epoch={good + batch_size}", "data.stream.resample=false",
                         "data.stream.shuffle_buffer=0", f"data.batch_size={batch_size}", "data.num_workers=1",
                         "trainer.max_steps=null", "trainer.epochs=1", "trainer.save_every=0",
                         "trainer.max_bad_fraction=0.1")
    results = train(cfg, tmp_path / "run")
    assert results["finished"] and results["step"] == good // batch_size + 1
    assert results["skipped_samples"] == planted


# ---------------------------------------------------------------------------------------------------------
# Crash safety: kill -9 at many points, a full disk during a save


# Runs the slip.train entry point as __main__ (what `python -m slip.train` does) in forked children, each
# with its own log file. The imports are done once, before any fork: that is what lets ten kill points fit
# in a minute on two cores. Protocol, one line each: "log<TAB>arg<TAB>arg..." in; child pid, then its wait
# status, out.
LAUNCHER = r'''
import os, runpy, sys
import slip.train  # the launcher (and through it the app)
import torch.utils.tensorboard  # the engine imports it lazily
del sys.modules["slip.train"]  # re-run below as __main__, not as the imported module
for line in sys.stdin:
    log, *args = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = ["slip.train", *args]
        code = 0
        try:
            runpy.run_module("slip.train", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
'''


class Launcher:
    """Starts training processes one at a time from a pre-imported parent (see LAUNCHER)."""

    def __init__(self, cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=cwd, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=subprocess_env(OMP_NUM_THREADS="1"))

    def start(self, log: Path, args: list[str]) -> int:
        """Start one run writing to `log`; returns its pid."""
        self.process.stdin.write("\t".join([str(log), *args]) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return int(self.process.stdout.readline())  # type: ignore[union-attr]

    def wait(self) -> int:
        """The wait status of the run started last, once it has ended."""
        return int(self.process.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        """End the launcher (it has no child running by then)."""
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=30)


def steps_logged(log: Path) -> list[int]:
    """The optimizer steps whose progress line a run has printed so far."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(line.split()[1].split("/")[0]) for line in text.splitlines() if line.startswith("step ")]


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of checkpoint saves in progress (or cut short) in `folder`."""
    return sorted(folder.glob(".last.pt.*.tmp")) if folder.exists() else []


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll `condition` every 2 ms until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the training process did not get there in time"
        time.sleep(0.002)


def test_kill_9_at_ten_points_including_mid_save_never_leaves_an_unreadable_checkpoint(tmp_path: Path) -> None:
    max_steps = 60
    args = [*FAST, *SMALL, f"trainer.max_steps={max_steps}", "trainer.save_every=1", f"output_root={tmp_path}"]
    checkpoints = tmp_path / "test" / "checkpoints"
    # Six kills at varied delays after the run's first step, then kills as soon as a save has begun (its
    # temporary file exists), until at least four of those and the last one are caught before the rename
    # (the save's temporary file is left behind).
    delays = [0.0, 0.013, 0.031, 0.07, 0.15, 0.3]
    launcher = Launcher(tmp_path)
    saved, kills, mid_save_kills, resumed_from, caught = 0, 0, 0, [], False
    try:
        while kills < len(delays) + 4 or not caught:
            assert kills < len(delays) + 12, "no kill landed inside a save"
            log = tmp_path / f"run{kills}.log"
            pid = launcher.start(log, args)
            wait_for(lambda: steps_logged(log))
            before = set(temporaries(checkpoints))
            if kills < len(delays):
                time.sleep(delays[kills])
            else:
                wait_for(lambda: set(temporaries(checkpoints)) - before)
            os.kill(pid, signal.SIGKILL)
            status = launcher.wait()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, log.read_text()[-2000:]
            caught = kills >= len(delays) and bool(set(temporaries(checkpoints)) - before)
            mid_save_kills += caught
            kills += 1
            if saved:
                resumed_from.append((saved, log.read_text()))
            # The latest checkpoint is always readable, never older than the one before, and at most the step
            # being saved (save_every=1) is lost.
            latest = checkpoints / "last.pt"
            step = read_checkpoint(latest)["state"]["step"] if latest.exists() else 0
            assert saved <= step and step >= max(steps_logged(log)) - 1
            saved = step
    finally:
        launcher.close()
    for step, text in resumed_from:
        assert f"resumed from step {step} " in text
    assert mid_save_kills >= 1 and temporaries(checkpoints)  # what the last kill left behind...
    assert saved < max_steps
    # The real command line resumes from the last checkpoint and finishes at the planned step.
    finished = subprocess.run([sys.executable, "-m", "slip.train", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=subprocess_env())
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resumed from step {saved} " in finished.stderr
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert results["finished"] and results["step"] == max_steps
    assert read_checkpoint(checkpoints / "last.pt")["state"]["step"] == max_steps
    assert not temporaries(checkpoints)  # ...is removed by the next successful save


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """Make the n-th torch.save (counting from 1) write a little, then fail as a full disk does."""
    real_save, calls = torch.save, []

    def install(nth: int, where: str = "write") -> None:
        def save(obj, handle, *args, **kwargs):
            calls.append(1)
            if len(calls) != nth:
                return real_save(obj, handle, *args, **kwargs)
            if where == "write":
                handle.write(b"partial checkpoint bytes")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_save(obj, handle, *args, **kwargs)  # the data fits in the page cache; fsync finds no room
            monkeypatch.setattr(os, "fsync", failing_fsync)

        monkeypatch.setattr(torch, "save", save)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return install


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_during_save_keeps_the_previous_file_and_says_so(tmp_path: Path, full_disk, where: str) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    full_disk(1, where)
    with pytest.raises(OSError) as info:
        atomic_save({"step": 2}, path)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    assert str(path) in message and "No space left on device" in message and "previous file there is intact" in message
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_during_a_training_save_stops_naming_the_kept_checkpoint(tmp_path: Path, full_disk) -> None:
    full_disk(3)  # saves at steps 1 and 2 succeed, the one of step 3 fails
    cfg = compose_config(*FAST, *SMALL, "trainer.max_steps=5", "trainer.save_every=1")
    with pytest.raises(TrainingError) as info:
        train(cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "could not save step 3" in message and "No space left on device" in message
    assert "the previous checkpoint (step 2) is intact" in message
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


# Makes the n-th torch.save to a file on rank 0 fail as a full disk does, in a process started by torchrun.
FULL_DISK_ON_RANK_0 = """
import errno, io, os
if os.environ.get("RANK") == "0":
    import torch
    _real_save, _calls = torch.save, []
    def _save(obj, handle, *args, **kwargs):
        if not isinstance(handle, io.BytesIO):  # torch.distributed pickles tensors through torch.save too
            _calls.append(1)
        if len(_calls) == int(os.environ["FAIL_SAVE_NUMBER"]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_save(obj, handle, *args, **kwargs)
    torch.save = _save
"""


def test_a_failed_save_on_rank_0_stops_every_rank_instead_of_leaving_them_waiting(tmp_path: Path) -> None:
    injected = tmp_path / "inject"
    injected.mkdir()
    (injected / "sitecustomize.py").write_text(FULL_DISK_ON_RANK_0)
    run_dir = tmp_path / "run"
    env = subprocess_env(FAIL_SAVE_NUMBER="3", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(injected), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "slip.train", *FAST, *SMALL, "trainer.max_steps=5", "trainer.save_every=1",
               f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "could not save step 3" in done.stderr and "the previous checkpoint (step 2) is intact" in done.stderr
    assert "rank 1: stopping because rank 0 could not save step 3" in done.stderr
    assert read_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["step"] == 2


# ---------------------------------------------------------------------------------------------------------
# Numerics: non-finite losses


class NonFiniteCLIPLoss(CLIPLoss):
    """CLIPLoss whose loss is multiplied by `value` (NaN or inf) on the given calls (1-based): injected faults."""

    def __init__(self, bad_calls: list[int], value: float = math.nan) -> None:
        super().__init__()
        self.bad_calls, self.value, self.calls = set(bad_calls), value, 0

    def forward(self, outputs):
        """CLIPLoss, with the fault injected on the chosen calls."""
        result = super().forward(outputs)
        self.calls += 1
        if self.calls in self.bad_calls:
            result["loss"] = result["loss"] * self.value
        return result


def non_finite_config(bad_calls: list[int], value: float, *overrides: str):
    """The training config with NonFiniteCLIPLoss as the objective (one call per step: update_freq=1)."""
    return compose_config(*FAST, *SMALL, f"loss._target_={__name__}.NonFiniteCLIPLoss",
                          f"+loss.bad_calls=[{','.join(map(str, bad_calls))}]", f"+loss.value={value}", *overrides)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_losses_skip_their_steps_and_are_logged(tmp_path: Path, capsys, value: str) -> None:
    cfg = non_finite_config([2, 4, 5], float(value), "trainer.max_steps=6", "trainer.max_nonfinite_steps=3")
    results = train(cfg, tmp_path)
    assert results["finished"] and results["step"] == 6
    logged = capsys.readouterr().err
    for step, in_a_row in [(2, 1), (4, 1), (5, 2)]:
        assert f"step {step}: non-finite loss, step skipped ({in_a_row} in a row)" in logged
    assert [row["step"] for row in results["history"]] == [1, 3, 6]
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {3.0}  # only the finite steps updated the weights...
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())  # ...and none went bad


def test_k_non_finite_losses_in_a_row_abort_naming_the_step(tmp_path: Path) -> None:
    cfg = non_finite_config([2, 3, 4], math.nan, "trainer.max_steps=6", "trainer.max_nonfinite_steps=3")
    with pytest.raises(TrainingError, match=r"non-finite loss in 3 steps in a row, the last at step 4;") as info:
        train(cfg, tmp_path)
    assert "\n" not in str(info.value)


def test_fp16_gradient_overflow_is_handled_by_the_grad_scaler(tmp_path: Path, capsys) -> None:
    """A loss scale far too large overflows the fp16 gradients: the scaler skips those steps and halves the scale.

    The loss itself stays finite, so this is the scaler's job, not the non-finite-loss check's.
    """
    init_scale = 2.0 ** 32
    cfg = compose_config(*FAST, *SMALL, "trainer.precision=fp16", f"trainer.init_grad_scale={init_scale}",
                         "trainer.max_steps=25", "trainer.log_every=1")
    results = train(cfg, tmp_path)
    logged = capsys.readouterr().err
    assert results["finished"] and results["step"] == 25 and "non-finite loss" not in logged
    overflows = logged.count("fp16 gradients overflowed, step skipped")
    assert 0 < overflows < 25
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert checkpoint["scaler"]["scale"] == init_scale / 2 ** overflows  # halved once per overflow
    assert f"loss scale lowered to {init_scale / 2 ** overflows:g}" in logged
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {25.0 - overflows}  # overflowed steps never touched the weights...
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())  # ...so none went bad
    assert all(math.isfinite(row["loss"]) for row in results["history"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoint loading security


class WritesAFile:
    """Unpickling this calls Path.touch: what a malicious checkpoint would do."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_resuming_from_a_malicious_checkpoint_refuses_it_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": "slip", "state": WritesAFile(target)}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: refused to unpickle") as info:
        train(compose_config(*FAST, *SMALL, "trainer.max_steps=1"), tmp_path)
    assert "\n" not in str(info.value) and not target.exists()


def test_the_namespace_allow_list_does_not_let_its_contents_through(tmp_path: Path) -> None:
    """argparse.Namespace is allowed (the original SLIP format), but not whatever it holds."""
    target = tmp_path / "pwned"
    args = argparse.Namespace(model="SLIP_VITS16", hook=WritesAFile(target))
    torch.save({"state_dict": {"module.x": torch.zeros(1)}, "args": args}, tmp_path / "slip.pt")
    with pytest.raises(CheckpointError, match=r"slip\.pt: refused to unpickle"):
        load_pretrained(tmp_path / "slip.pt")
    assert not target.exists()


def test_a_torchscript_archive_is_not_a_training_checkpoint(tmp_path: Path) -> None:
    """TorchScript loads only through load_pretrained's OpenAI-CLIP path; resuming refuses it in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates scripting (not loading)
        scripted = torch.jit.script(nn.Linear(2, 2))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(CheckpointError, match=r"scripted\.pt: a TorchScript archive, not a slip checkpoint") as info:
        read_checkpoint(tmp_path / "scripted.pt")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Config validation (the rest: test_train.py::test_bad_values_fail_before_training_naming_the_key)


@pytest.mark.parametrize(
    ("override", "key", "named"),
    [("optim.lr=-0.1", "optim.lr", "-0.1"), ("optim.weight_decay=-1", "optim.weight_decay", "-1"),
     ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps", "0"),
     ("trainer.max_bad_fraction=1.5", "trainer.max_bad_fraction", "1.5"),
     ("data.batch_size=-3", "data.batch_size", "-3"),
     ("trainer.strategy=zero3", "trainer.strategy", "zero3"),
     ("trainer.fsdp.cpu_offload=maybe", "trainer.fsdp.cpu_offload", "maybe"),
     ("+trainer.fsdp.shard_degree=2", "trainer.fsdp.shard_degree", "unknown key")],
)
def test_out_of_range_values_fail_before_training(tmp_path: Path, override: str, key: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(compose_config(*FAST, *SMALL, override), tmp_path)
    message = str(info.value)
    assert message.startswith(key) and named in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()
