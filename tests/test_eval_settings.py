"""Evaluation settings are checked config nodes like the training ones: conf/eval.yaml and conf/val/*.yaml build
against their dataclasses, the YAML holds every default, and a bad value stops with one line naming the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from slip.app.config import ConfigError, build
from slip.app.eval_settings import EvalSettings, KnnSettings, LinearProbeSettings, ValSettings
from slip.app.evaluate import evaluate
from train_helpers import CONF_DIR, compose_config

SETTINGS = (EvalSettings, KnnSettings, LinearProbeSettings, ValSettings)
VAL_PRESETS = sorted(path.stem for path in (CONF_DIR / "val").glob("*.yaml") if path.stem != "none")


def eval_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda settings: settings.__name__)
def test_the_yaml_holds_every_default(settings: type) -> None:
    defaulted = [field.name for field in dataclasses.fields(settings)
                 if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING]
    assert defaulted == []


def test_the_shipped_eval_config_builds() -> None:
    cfg = eval_config("checkpoint=somewhere")
    settings = build(cfg, "", _recursive_=False)
    assert isinstance(settings, EvalSettings) and settings.checkpoint == "somewhere"
    assert build(cfg.linear_probe, "linear_probe") == LinearProbeSettings("lbfgs", 0.2, 4, 1000, 0, None)
    assert build(cfg.knn, "knn") == KnnSettings(20, 0.07)


@pytest.mark.parametrize("preset", VAL_PRESETS)
def test_every_shipped_val_preset_builds(preset: str) -> None:
    cfg = compose_config(f"val={preset}", "val.dataset.root=/nowhere" if preset == "imagenet" else "val.batch_size=8")
    settings = build(cfg.val, "val", _recursive_=False)
    assert isinstance(settings, ValSettings) and settings.max_images == "auto"


@pytest.mark.parametrize("override, message", [
    ("batch_size=many", r"^batch_size: expected int, got 'many'$"),
    ("num_workers=1.5", r"^num_workers: expected int, got 1\.5$"),
    ("+colour=red", r"^colour: unknown key for slip\.app\.eval_settings\.EvalSettings"),
    ("linear_probe.method=adam", r"^linear_probe\.method: method must be one of \['lbfgs', 'sgd'\], got 'adam'$"),
    ("linear_probe.max_iter=lots", r"^linear_probe\.max_iter: expected int, got 'lots'$"),
    ("+linear_probe.tolerance=1", r"^linear_probe\.tolerance: unknown key"),
    ("knn.k=1.5", r"^knn\.k: expected int, got 1\.5$"),
    ("linear_probe.val_groups=path:x",
     r"^linear_probe\.val_groups: val_groups 'path:x': expected 'path:N' with N an integer"),
    ("linear_probe.val_groups=''", r"^linear_probe\.val_groups: val_groups must be a CSV column name or 'path:N'"),
    ("linear_probe.val_groups=3", r"^linear_probe\.val_groups: expected str \| None, got 3$"),
    ("linear_probe.method=sgd linear_probe.val_groups=object",
     r"^linear_probe\.val_groups: val_groups splits the lbfgs probe's validation set; sgd holds none out$"),
    ("linear_probe.val_fraction=1.0", r"^linear_probe\.val_fraction: val_fraction must be in \(0, 1\), got 1\.0$"),
    ("linear_probe.refinements=-1", r"^linear_probe\.refinements: refinements must be >= 0, got -1$"),
    ("knn.k=0", r"^knn\.k: k must be a positive integer, got 0$"),
    ("knn.temperature=0", r"^knn\.temperature: temperature must be a finite number > 0, got 0$"),
    ("device=gpu0", r"^device: 'gpu0' is not a device \(auto, cpu, cuda, cuda:N\)$"),
])
def test_a_bad_eval_setting_stops_before_any_work_naming_the_key(override: str, message: str,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate(eval_config(f"checkpoint={tmp_path / 'not-there.pt'}", *override.split()))  # checked before the file


@pytest.mark.parametrize("override, message", [
    ("val.max_images=1.5", r"^val\.max_images: expected int \| str, got 1\.5$"),
    ("val.batch_size=all", r"^val\.batch_size: expected int, got 'all'$"),
    ("+val.shuffle=true", r"^val\.shuffle: unknown key for slip\.app\.eval_settings\.ValSettings"),
])
def test_a_bad_val_setting_names_the_key(override: str, message: str) -> None:
    cfg = compose_config("experiment=debug", override)
    with pytest.raises(ConfigError, match=message):
        build(cfg.val, "val", _recursive_=False)


def test_the_trainer_nodes_python_defaults_are_the_yamls() -> None:
    """TrainerSettings keeps Python defaults, because older saved configs that lack a key added since are read with
    them (slip.app.migrations.fill_added_defaults); they must equal conf/trainer/default.yaml, which sets every key."""
    from slip.app.engine import TrainerSettings

    from hydra.utils import instantiate

    shipped = compose_config().trainer
    fields = {field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
              for field in dataclasses.fields(TrainerSettings)}
    assert set(shipped) - {"_target_"} == set(fields)
    built = {name: instantiate(shipped[name]) if dataclasses.is_dataclass(default) else shipped[name]
             for name, default in fields.items()}  # a nested node (trainer.fsdp) built by its own _target_
    assert {name: default for name, default in fields.items() if built[name] != default} == {}


def test_a_device_torch_cannot_read_stops_training_before_any_work_naming_the_key() -> None:
    cfg = compose_config("experiment=debug", "trainer.device=gpu0")
    with pytest.raises(ConfigError, match=r"^trainer\.device: 'gpu0' is not a device \(auto, cpu, cuda, cuda:N\)$"):
        build(cfg.trainer, "trainer")
