"""python -m slip.export: a run's checkpoint in another format, with its model card; all or nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slip.export import main
from slip.pretrained import load_pretrained
from slip.train import train
from train_helpers import FAST, compose_config, subprocess_env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step SLIP run with zero-shot validation at the end (its results.json holds top-1)."""
    root = tmp_path_factory.mktemp("run")
    train(compose_config(*FAST, "loss=slip", "trainer.max_steps=2", "val=synthetic", "val.dataset.num_samples=24",
                         "val.batch_size=24"), root)
    return root


def test_safetensors_export_keeps_every_weight_and_writes_the_model_card(run_dir: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    checkpoint = run_dir / "checkpoints" / "last.pt"
    main([str(checkpoint), "--to", "safetensors", "--out", str(tmp_path / "out")])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["README.md", "model.safetensors"]
    assert "wrote" in capsys.readouterr().out
    want, got = load_pretrained(checkpoint), load_pretrained(tmp_path / "out" / "model.safetensors")
    assert want.state_dict().keys() == got.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ViT (SLIP's timm layout), 32 px, patch 4, width 128, 4 layers, 4 heads" in card
    assert "- Objective: SLIPLoss; steps trained: 2" in card
    assert "- Training data: slip.data.synthetic.SyntheticShapes (split=train, num_samples=64" in card
    assert "| train_zeroshot/top1 |" in card


def one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("slip.export: error: ") and error.count("\n") == 1
    return error


def test_an_occupied_output_directory_is_refused_and_left_as_it_was(run_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    error = one_line_error([str(run_dir / "checkpoints" / "last.pt"), "--to", "safetensors", "--out",
                            str(tmp_path / "out")], capsys)
    assert "exists and is not an empty directory" in error
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("target", ["hf", "open_clip"])
def test_a_model_the_target_cannot_express_writes_nothing(run_dir: Path, tmp_path: Path, target: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    # The tiny model is a SLIP-layout timm ViT: no LayerNorm before the blocks, patch bias, GELU.
    one_line_error([str(run_dir / "checkpoints" / "last.pt"), "--to", target, "--out", str(tmp_path / "out")],
                   capsys)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_the_command_line_entry_point(run_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "slip.export", str(run_dir / "nothing.pt"), "--to",
                             "safetensors", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, env=subprocess_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"slip.export: error: {run_dir / 'nothing.pt'}: no such checkpoint file or directory"
