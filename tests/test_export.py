"""python -m slip.export: a run's checkpoint in another format, with its model card; all or nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slip.checkpoint import save_model
from slip.app.export import export, main
from slip.losses import SigLIPLoss
from slip.models import tiny
from slip.pretrained import load_pretrained, load_pretrained_with_info
from slip.app.train import train
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


# ---------------------------------------------------------------- SigLIP: the objective's learned logit bias


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A tiny OpenAI-layout ViT (every target can express it) saved with a SigLIP objective whose bias is learned:
    the checkpoint's path and the bias."""
    model = tiny(openai_layout=True, inputs=("image", "text")).eval()
    objective = SigLIPLoss()
    with torch.no_grad():
        objective.logit_bias.copy_(torch.tensor(-9.8765432))  # not a round number in float32
    path = save_model(model, tmp_path_factory.mktemp("siglip") / "siglip.pt", objective)
    return path, objective.logit_bias.detach().clone()


def bit_equal(value: float | torch.Tensor, want: torch.Tensor) -> bool:
    """Whether `value` is `want` to the bit (a Python float holds every float32 exactly)."""
    got = torch.as_tensor(value, dtype=want.dtype).reshape(want.shape)
    return torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_safetensors_export_keeps_the_siglip_bias_bit_equal(siglip_checkpoint: tuple[Path, torch.Tensor],
                                                           tmp_path: Path) -> None:
    from safetensors import safe_open

    checkpoint, bias = siglip_checkpoint
    assert bit_equal(load_pretrained_with_info(checkpoint)[1].logit_bias, bias)
    first = export(checkpoint, "safetensors", tmp_path / "first").files[0]
    with safe_open(str(first), "pt") as handle:
        assert bit_equal(handle.get_tensor("objective.logit_bias"), bias)
    second = export(first, "safetensors", tmp_path / "second").files[0]  # .safetensors -> .safetensors
    for path in (first, second):
        model, info = load_pretrained_with_info(path)
        assert bit_equal(info.logit_bias, bias)
        assert not any(key.startswith("objective.") for key in model.state_dict())
    assert f"- Learned logit bias: {float(bias)!r} " in (tmp_path / "second" / "README.md").read_text()


def test_open_clip_export_carries_the_siglip_bias(siglip_checkpoint: tuple[Path, torch.Tensor], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    open_clip = pytest.importorskip("open_clip")
    checkpoint, bias = siglip_checkpoint
    main([str(checkpoint), "--to", "open_clip", "--out", str(tmp_path / "oc")])
    assert capsys.readouterr().err == ""  # nothing left out
    theirs = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    assert bit_equal(theirs.logit_bias.detach(), bias)
    pixels, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32))
    with torch.no_grad():
        assert bit_equal(theirs(pixels, text)[3], bias)  # open_clip's forward returns the bias SigLIP scores use
    assert f"- Learned logit bias: {float(bias)!r} " in (tmp_path / "oc" / "README.md").read_text()
    _, info = load_pretrained_with_info(tmp_path / "oc")  # and back: open_clip -> ours -> safetensors
    assert info.objective == "SigLIPLoss" and bit_equal(info.logit_bias, bias)
    export(tmp_path / "oc", "safetensors", tmp_path / "back")
    assert bit_equal(load_pretrained_with_info(tmp_path / "back" / "model.safetensors")[1].logit_bias, bias)


def test_hf_export_warns_in_one_line_naming_the_bias_and_the_card_states_it(
        siglip_checkpoint: tuple[Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    checkpoint, bias = siglip_checkpoint
    main([str(checkpoint), "--to", "hf", "--out", str(tmp_path / "hf")])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("slip.export: warning: ")
    assert f"logit_bias={float(bias)!r} has no place in a transformers CLIPModel" in error
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"- Learned logit bias: {float(bias)!r} " in card and "- Left out: the objective's logit_bias=" in card


def test_exports_without_an_objective_tensor_are_as_before(run_dir: Path, tmp_path: Path) -> None:
    """A SLIP run's checkpoint has an objective with no tensors: nothing is added to the file or the card."""
    from safetensors import safe_open

    checkpoint = run_dir / "checkpoints" / "last.pt"
    result = export(checkpoint, "safetensors", tmp_path / "out")
    assert result.warnings == [] and load_pretrained_with_info(checkpoint)[1].logit_bias is None
    with safe_open(str(result.files[0]), "pt") as handle:
        assert set(handle.keys()) == set(load_pretrained(checkpoint).state_dict())
        assert set(handle.metadata()) == {"format", "format_version", "spec", "objective", "step"}
    assert "logit bias" not in (tmp_path / "out" / "README.md").read_text()
