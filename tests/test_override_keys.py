"""Unknown keys and group options on the command line: one line naming the key and the closest valid one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from slip.app.config import ConfigError
from slip.app.override_keys import check_override_keys
from slip.app.train import cli
from train_helpers import CONF_DIR, FAST, compose_config


def check(*args: str) -> None:
    check_override_keys(CONF_DIR, "train", args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_step=3"], "trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
        (["~trainer.max_step"], "trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
        (["trainr.max_steps=3"], "trainr.max_steps: unknown key (did you mean trainer.max_steps?)"),
        (["modle=tiny"], "modle: unknown key (did you mean model?)"),
        (["model.patch_dropot=0.1"], "model.patch_dropot: unknown key (did you mean model.patch_dropout?)"),
        (["data=csv", "data.source.num_samples=3"],
         "data.source.num_samples: unknown key (data.source has: _target_, path, image_column, caption_column, sep, "
         "group_by_image)"),
        (["model=vit_b61"], "model=vit_b61: unknown option (did you mean model=vit_b16?)"),
        (["experiment=paper/vit_b16_slp"],
         "experiment=paper/vit_b16_slp: unknown option (did you mean experiment=paper/vit_b16_slip?)"),
        (["-m", "loss=clip,simcl"], "loss=simcl: unknown option (did you mean loss=simclr?)"),
        (["--multirun", "loss=clip,simclr", "trainer.max_stepz=2"],
         "trainer.max_stepz: unknown key (did you mean trainer.max_steps?)"),
        (["-m", "data=csv,synthetic", "data.source.path=x"],
         "data.source.path: unknown key with data=synthetic (data.source has: _target_, split, num_samples, "
         "image_size, seed)"),
    ],
)
def test_an_unknown_key_or_option_is_named_with_the_closest_valid_one(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(*args)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "args",
    [
        FAST,
        ["-m", "loss=clip,simclr,slip", "model=glob(vit_*)", "trainer.max_steps=1,2"],
        ["experiment=paper/vit_b16_slip", "data.source.metadata_pickle=/x.pkl", "data.source.zip_root=/y"],
        ["+trainer.extra=1", "trainer.extra=2", "++optim.new_key=3"],  # adds are Hydra's to judge
        ["hydra/launcher=slurm", "hydra.launcher.nodes=8", "hydra.nonsense=1"],  # so are Hydra's own settings
        ["~val", "experiment=null", "augment.ssl_crop_scale=[0.2,1.0]", "trainer.max_steps=null"],
        ["--config-dir", "/elsewhere", "trainer.max_step=3"],  # another config: Hydra reads the line
        ["trainer.max_steps=(("],  # a syntax error: Hydra says where
    ],
)
def test_valid_lines_and_lines_left_to_hydra_pass(args: list[str]) -> None:
    check(*args)


@pytest.mark.parametrize(
    "overrides",
    [["trainer.max_step=3"], ["trainer.max_steps=3"], ["~trainer.max_step"], ["~trainer.seed"],
     ["model=vit_b61"], ["model=vit_b16", "model.patch_dropout=0.1"], ["model=rn50", "model.patch_dropout=0.1"],
     ["data=csv", "data.source.path=x"], ["data.source.path=x"], ["val=none", "val.batch_size=2"],
     ["val.batch_size=2"], ["experiment=debug", "trainer.seed=1"], ["loss.temperature=0.1"],
     ["loss=simclr", "loss.temperature=0.1"], ["run_nam=x"], ["output_root=/tmp/x"], ["optim.lrr=1"]],
)
def test_refuses_exactly_what_hydra_refuses_to_compose(overrides: list[str]) -> None:
    try:
        compose_config(*overrides)
        hydra_refuses = False
    except (HydraException, OmegaConfBaseException):
        hydra_refuses = True
    try:
        check(*overrides)
        refused = False
    except ConfigError:
        refused = True
    assert refused == hydra_refuses


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["trainer.max_step=3"], "trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
        (["model=vit_b61"], "model=vit_b61: unknown option (did you mean model=vit_b16?)"),
        (["-m", "loss=clip,simclr", *FAST, "trainer.max_stepz=2"],
         "trainer.max_stepz: unknown key (did you mean trainer.max_steps?)"),
    ],
)
def test_the_command_line_stops_with_one_line_before_hydra_runs(tmp_path: Path, args: list[str], line: str,
                                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`slip-train`'s entry point in this process (test_train.py runs `python -m slip.train` as a subprocess)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["slip-train", *args, f"output_root={tmp_path}"])
    with pytest.raises(SystemExit) as stopped:
        cli()
    assert (stopped.value.code, capsys.readouterr().err.splitlines()) == (2, [f"slip.train: error: {line}"])
    assert not any(tmp_path.iterdir())  # nothing started: no run or sweep directory
