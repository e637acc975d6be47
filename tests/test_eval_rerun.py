"""Re-running python -m slip.eval: results that exist for the same checkpoint and settings are skipped (and it says
so); a changed setting or checkpoint, or overwrite=true, recomputes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from slip.app.config import ConfigError
from slip.app.evaluate import evaluate
from slip.app.train import train
from train_helpers import CONF_DIR, FAST, compose_config

# An image-only model, so that the two feature tasks run (zero-shot and retrieval need a text tower).
SMALL = ["catalog.synthetic.train.num_samples=96", "catalog.synthetic.test.num_samples=48", "batch_size=32",
         "linear_probe.max_iter=20", "linear_probe.refinements=0", "tasks.zeroshot=[]", "tasks.retrieval=[]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a 1-step SimCLR run."""
    run = tmp_path_factory.mktemp("run")
    train(compose_config(*FAST, "loss=simclr", "trainer.max_steps=1"), run)
    return run / "checkpoints" / "last.pt"


def run_eval(capsys: pytest.CaptureFixture, checkpoint: Path, out: Path, *overrides: str) -> str:
    """What `python -m slip.eval` prints for these overrides, results and feature cache under `out`."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"checkpoint={checkpoint}", f"output_dir={out}",
                                         f"feature_cache={out / 'cache'}", *SMALL, *overrides])
    capsys.readouterr()
    evaluate(cfg)
    return capsys.readouterr().out


def skip_line(task: str, out: Path) -> str:
    return f"skipped {task} on synthetic: results for this checkpoint and settings exist in {out / f'{task}.json'}"


def test_the_same_checkpoint_and_settings_are_skipped_and_it_says_so(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    first = run_eval(capsys, checkpoint, tmp_path)
    assert "linear_probe on synthetic: top1" in first and "knn on synthetic: top1" in first
    assert "skipped" not in first
    files = {task: tmp_path / f"{task}.json" for task in ("linear_probe", "knn")}
    before = {task: (path.read_bytes(), path.stat().st_mtime_ns) for task, path in files.items()}
    shutil.rmtree(tmp_path / "cache")
    second = run_eval(capsys, checkpoint, tmp_path)
    assert skip_line("linear_probe", tmp_path) in second and skip_line("knn", tmp_path) in second
    assert "top1" not in second
    assert not (tmp_path / "cache").exists()  # no features were extracted, so nothing was recomputed
    assert {task: (path.read_bytes(), path.stat().st_mtime_ns) for task, path in files.items()} == before


def test_a_changed_setting_recomputes_its_task_and_skips_the_others(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run_eval(capsys, checkpoint, tmp_path)
    knn_before = (tmp_path / "knn.json").read_bytes()
    printed = run_eval(capsys, checkpoint, tmp_path, "linear_probe.seed=1")
    assert "linear_probe on synthetic: top1" in printed and skip_line("linear_probe", tmp_path) not in printed
    assert skip_line("knn", tmp_path) in printed and (tmp_path / "knn.json").read_bytes() == knn_before
    stored = json.loads((tmp_path / "linear_probe.json").read_text())
    assert stored["settings"]["synthetic"]["linear_probe"]["seed"] == 1
    # The catalog entry is a setting too.
    printed = run_eval(capsys, checkpoint, tmp_path, "linear_probe.seed=1", "catalog.synthetic.test.num_samples=40")
    assert "linear_probe on synthetic: top1" in printed and "knn on synthetic: top1" in printed


def test_a_changed_checkpoint_recomputes(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_eval(capsys, checkpoint, tmp_path)
    first = json.loads((tmp_path / "knn.json").read_text())
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name] = state["model"][name] + 0.5
    other = tmp_path / "other.pt"
    torch.save(state, other)
    printed = run_eval(capsys, other, tmp_path)
    assert "skipped" not in printed and "knn on synthetic: top1" in printed
    second = json.loads((tmp_path / "knn.json").read_text())
    assert second["fingerprint"] != first["fingerprint"] and second["checkpoint"] == str(other.resolve())


def test_overwrite_recomputes_and_must_be_a_bool(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run_eval(capsys, checkpoint, tmp_path)
    printed = run_eval(capsys, checkpoint, tmp_path, "overwrite=true")
    assert "skipped" not in printed and "linear_probe on synthetic: top1" in printed
    with pytest.raises(ConfigError, match=r"^overwrite: expected bool, got 'yes'$"):
        run_eval(capsys, checkpoint, tmp_path, "overwrite=yes")
