"""Run identity (slip.run_identity): what a resume must keep, what may change, and finished runs left alone."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from train_helpers import EXACT_RUN, FAST, TINY_RESNET, assert_same_run, compose_config, losses_by_step, weights_of

from slip.app.config import ConfigError
from slip.app.engine import TrainerSettings
from slip.app.run_identity import (FREE_SECTIONS, IDENTITY_SECTIONS, TRAINER_FREE_KEYS, TRAINER_IDENTITY_KEYS,
                               check_resume)
from slip.app.run_layout import CHECKPOINT_IN_RUN, CONFIG_FILE, RESULTS_FILE
from slip.app.train import train

BASE = [*FAST, "loss=slip", "trainer.max_steps=2"]
RUN_FILES = (CHECKPOINT_IN_RUN, Path(CONFIG_FILE), Path(RESULTS_FILE))


def test_every_trainer_setting_is_either_part_of_the_run_or_free_to_change() -> None:
    fields = {field.name for field in dataclasses.fields(TrainerSettings)}
    assert not TRAINER_IDENTITY_KEYS & TRAINER_FREE_KEYS
    assert TRAINER_IDENTITY_KEYS | TRAINER_FREE_KEYS == fields


def test_every_top_level_config_key_is_either_compared_or_free() -> None:
    sections = set(IDENTITY_SECTIONS) | set(FREE_SECTIONS)
    assert not set(IDENTITY_SECTIONS) & set(FREE_SECTIONS)
    assert set(compose_config(*FAST)) == sections | {"trainer"}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 steps stopped after the first (resumable), to be copied by each test."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    train(compose_config(*BASE, "trainer.stop_after=1"), run_dir)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {name: (run_dir / name).read_bytes() for name in RUN_FILES if (run_dir / name).exists()}


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.update_freq=2", r"^trainer\.update_freq: the global batch 8 x 1 process x update_freq 2 = 16 differs "
                              r"from the checkpoint .* \(8 x 1 process x update_freq 1 = 8\)"),
    ("data.batch_size=16", r"^data\.batch_size: the global batch 16 x 1 process x update_freq 1 = 16 differs"),
    ("trainer.accumulation=independent", r"^trainer\.accumulation: differs from the checkpoint .* "
                                         r"\('exact' there, 'independent' here\)"),
    ("trainer.precision=fp64", r"^trainer\.precision: differs .* \('auto' there, 'fp64' here\)"),
    ("trainer.grad_clip=1.0", r"^trainer\.grad_clip: differs .* \(None there, 1\.0 here\)"),
    ("trainer.seed=1", r"^trainer\.seed: differs .* \(0 there, 1 here\)"),
    ("trainer.init_grad_scale=1024", r"^trainer\.init_grad_scale: differs"),
    ("optim.lr=0.1", r"^optim\.lr: differs .* \(0\.003 there, 0\.1 here\)"),
    ("augment.clip_scale=[0.9,1.0]", r"^augment\.clip_scale\[0\]: differs"),
])
def test_resuming_with_a_setting_that_changes_the_training_stops_naming_it_and_writes_nothing(
        stopped_run: Path, tmp_path: Path, override: str, message: str) -> None:
    run_dir = _copy(stopped_run, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError, match=message) as info:
        train(compose_config(*BASE, override), run_dir)
    assert "\n" not in str(info.value)
    assert _snapshot(run_dir) == before


def test_settings_free_to_change_continue_the_run(stopped_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(stopped_run, tmp_path)
    free = ["trainer.log_every=2", "trainer.save_every=1", "trainer.eval_every=5", "trainer.device=cpu",
            "trainer.grad_checkpointing=true", "trainer.max_bad_fraction=0.5", "trainer.max_nonfinite_steps=2",
            "trainer.retain_freed_memory=false", "trainer.log_images=true", "data.num_workers=1", "val=synthetic",
            "val.dataset.num_samples=24", "trainer.max_steps=3"]
    results = train(compose_config(*BASE, *free), run_dir)
    assert results["finished"] and results["step"] == 3 and results["validation"] == "done"
    assert [row["step"] for row in results["history"]] == [1, 2, 3]


def test_a_finished_run_run_again_trains_nothing_and_rewrites_nothing(tmp_path: Path, capsys) -> None:
    """The issue's example: re-running a finished run with the same config, then with update_freq=2."""
    first = train(compose_config(*BASE), tmp_path)
    assert first["finished"]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    again = train(compose_config(*BASE), tmp_path)
    assert again == json.loads(before[Path(RESULTS_FILE)])
    assert "finished all 2 steps and is validated; nothing to do" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^trainer\.update_freq: the global batch"):
        train(compose_config(*BASE, "trainer.update_freq=2"), tmp_path)
    assert _snapshot(tmp_path) == before


def test_a_finished_run_can_be_extended_but_not_cut_short(tmp_path: Path) -> None:
    train(compose_config(*BASE), tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps: the run is at step 2 .* past the 1 steps"):
        train(compose_config(*FAST, "loss=slip", "trainer.max_steps=1"), tmp_path)
    extended = train(compose_config(*FAST, "loss=slip", "trainer.max_steps=3"), tmp_path)
    assert extended["finished"] and [row["step"] for row in extended["history"]] == [1, 2, 3]


def test_the_same_global_batch_in_another_layout_continues_the_run_exactly(
        tmp_path: Path, exact_run_at_batch_8: tuple[dict[int, float], dict]) -> None:
    """A ViT on map-style data: batch 8 for 3 steps, then batch 4 x update_freq 2 with a loader worker, equals
    batch 8 throughout (float64; 6 steps cross an epoch boundary). Processes: tests/test_train.py."""
    train(compose_config(*EXACT_RUN, "data.batch_size=8", "trainer.stop_after=3"), tmp_path / "split")
    resumed = train(compose_config(*EXACT_RUN, "data.batch_size=4", "trainer.update_freq=2", "data.num_workers=1"),
                    tmp_path / "split")
    whole_losses, whole_weights = exact_run_at_batch_8  # the uninterrupted run at batch 8 (conftest.py)
    assert_same_run(losses_by_step(resumed), weights_of(tmp_path / "split"), whole_losses, whole_weights)


def test_a_resnet_tower_keeps_its_batch_layout(tmp_path: Path) -> None:
    """BatchNorm in the tower normalises each micro-batch on its own: another layout would train another model."""
    overrides = [*FAST, "loss=clip", *TINY_RESNET, "trainer.max_steps=2"]
    train(compose_config(*overrides, "trainer.stop_after=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: the batch layout 4 x 1 process x update_freq 2 = 8 .*"
                                          r"image tower's BatchNorm normalises each micro-batch"):
        train(compose_config(*overrides, "data.batch_size=4", "trainer.update_freq=2"), tmp_path)


@pytest.mark.parametrize(("data", "change", "reason"), [
    (["data=webdataset", "data.stream.urls='/shards/{0..9}.tar'", "data.stream.samples_per_epoch=640"],
     ["data.batch_size=4", "trainer.update_freq=2"], r"^data\.batch_size: .*a stream's readers split it"),
    (["data=webdataset", "data.stream.urls='/shards/{0..9}.tar'", "data.stream.samples_per_epoch=640"],
     ["data.num_workers=2"], r"^data\.num_workers: differs"),
    (["trainer.update_freq=2", "trainer.accumulation=independent"],
     ["data.batch_size=16", "trainer.update_freq=1"], r"^data\.batch_size: .*accumulation=independent sums"),
])
def test_a_layout_that_would_change_the_data_or_the_objective_is_refused(data: list[str], change: list[str],
                                                                         reason: str) -> None:
    base = [override for override in BASE if not (data[0] == "data=webdataset" and override.startswith("data.source"))]
    saved = compose_config(*base, *data)
    with pytest.raises(ConfigError, match=reason):
        check_resume(saved, compose_config(*base, *data, *change), 1, 1, None, Path("last.pt"))


def test_a_changed_number_of_processes_alone_changes_the_global_batch() -> None:
    cfg = compose_config(*BASE)
    with pytest.raises(ConfigError, match=r"^processes: the global batch 8 x 1 process x update_freq 1 = 8 differs "
                                          r"from the checkpoint last\.pt \(8 x 2 processes x update_freq 1 = 16\)"):
        check_resume(cfg, cfg, 2, 1, None, Path("last.pt"))
