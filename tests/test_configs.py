"""Every shipped config composes and builds: every model and every loss (each loss with a ViT and a ResNet), each data
format on tiny files, augment and optim."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from slip.app.config import ConfigError, build, check_node
from slip.data.dataset import ImageTextDataset
from slip.inputs import is_local_view
from slip.app.engine import TrainerSettings
from slip.app.train import train
from data_helpers import image_bytes, write_image, write_shard
from train_helpers import CONF_DIR, FAST, compose_config

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                     for p in (CONF_DIR / "experiment").rglob("*.yaml"))


# Every model with SLIP's loss, and every loss with a ViT and a ResNet model (what a loss preset sets of the model,
# and which inputs it needs, depends on the tower family, not on the preset's size).
PAIRS = sorted({*((model, "slip") for model in MODELS),
                *((model, loss) for model in ("tiny", "rn50") for loss in LOSSES)})


@pytest.mark.parametrize("model, loss", PAIRS)
def test_every_model_and_loss_builds(model: str, loss: str) -> None:
    cfg = compose_config(f"model={model}", f"loss={loss}", "run_name=x")
    objective = build(cfg.loss, "loss")
    with torch.device("meta"):
        fixed = [name for name in objective.inputs if not is_local_view(name)]
        tower = build(cfg.model, "model", inputs=fixed).spec.vision
        if len(fixed) < len(objective.inputs) and not tower.takes_smaller_crops:
            with pytest.raises(ConfigError, match=r"^model: local views \(local1, .*\) need an image tower "):
                build(cfg.model, "model", inputs=list(objective.inputs))
            return
        built = build(cfg.model, "model", inputs=list(objective.inputs))
    assert built.inputs == objective.inputs
    assert (built.text is None) == ("text" not in objective.inputs)
    assert (built.image_mlp is None) == ("aug1" not in objective.inputs)
    transform = build(cfg.augment, "augment")(
        inputs=objective.inputs, image_size=built.spec.preprocess.image_size, mean=built.spec.preprocess.mean,
        std=built.spec.preprocess.std, context_length=built.spec.text.context_length)
    assert set(transform.views) | ({"text"} if "text" in objective.inputs else set()) == set(objective.inputs)
    optimizer = build(cfg.optim, "optim")([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8
    assert isinstance(build(cfg.trainer, "trainer"), TrainerSettings)


def test_paper_recipe_learning_rates() -> None:
    recipes = {loss: compose_config(f"loss={loss}", "run_name=x").optim for loss in ("clip", "simclr", "slip")}
    assert (recipes["clip"].lr, recipes["clip"].weight_decay) == (5e-4, 0.5)
    assert (recipes["slip"].lr, recipes["slip"].weight_decay) == (3e-3, 0.1)
    assert (recipes["simclr"].lr, recipes["simclr"].weight_decay) == (3e-3, 0.1)
    schedule = OmegaConf.load(CONF_DIR / "schedule" / "cosine.yaml")  # the synthetic default shortens warmup
    assert (schedule.warmup_epochs, schedule.start_lr, schedule.end_lr) == (1.0, 1e-6, 1e-5)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_config(f"experiment={experiment}", "run_name=x")
    for key in ("model", "loss", "trainer", "augment"):
        check_node(cfg[key], key)


@pytest.mark.parametrize("model", ["vit_s16", "vit_b16", "vit_l16"])
@pytest.mark.parametrize(("loss", "lr", "weight_decay"), [("clip", 5e-4, 0.5), ("simclr", 3.2e-3, 0.1),
                                                          ("slip", 3e-3, 0.1)])
def test_paper_recipes_are_the_papers(model: str, loss: str, lr: float, weight_decay: float) -> None:
    cfg = compose_config(f"experiment=paper/{model}_{loss}")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.epochs) == (lr, weight_decay, 25)
    assert cfg.data.batch_size * 64 == 4096 and cfg.data.source._target_.endswith("YFCC15MSource")
    assert (cfg.schedule.warmup_epochs, cfg.model._target_) == (1.0, f"slip.models.{model}")
    objective = build(cfg.loss, "loss")
    with torch.device("meta"):
        built = build(cfg.model, "model", inputs=list(objective.inputs))
    assert built.spec.preprocess.image_size == 224 and built.inputs == objective.inputs


# ---------------------------------------------------------------- each data format on tiny files


def make_tiny_datasets(root: Path) -> dict[str, list[str]]:
    """One small dataset per data config, in its published layout; returns the overrides that point at it."""
    images = root / "images"
    for name in ("a", "b", "c", "d"):
        write_image(images / f"{name}.png", color=(40 * ord(name) % 255, 90, 160))
    (root / "pairs.csv").write_text("filepath,title\n" + "".join(f"images/{n}.png,photo {n}\n" for n in "abcd"))
    (root / "coco.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate("abcd")],
        "annotations": [{"image_id": i, "caption": f"a photo of {n}"} for i, n in enumerate("abcd")],
    }))
    np.save(root / "cc3m.npy", np.array([{"image_id": f"{n}.png", "captions": [f"cc {n}"]} for n in "abcd"]),
            allow_pickle=True)
    np.save(root / "cc12m.npy", np.array([{"image_id": i, "image_name": f"{n}.png", "captions": [f"cc {n}"]}
                                          for i, n in enumerate("abcd")]), allow_pickle=True)
    for n in "abcd":
        write_image(root / "redcaps" / "pics" / f"{n}.jpg", fmt="JPEG")
    (root / "redcaps.json").write_text(json.dumps(
        [{"image_id": n, "subreddit": "pics", "caption": f"reddit {n}"} for n in "abcd"]))
    ids = [12345000 + i for i in range(4)]
    (root / "yfcc" / "12").mkdir(parents=True)
    with zipfile.ZipFile(root / "yfcc" / "12" / "345.zip", "w") as archive:
        for image_id in ids:
            archive.writestr(f"{image_id % 1000:03d}.jpg", image_bytes(fmt="JPEG"))
    (root / "yfcc15m.pkl").write_bytes(pickle.dumps([(i, f"title {i}", f"description {i}") for i in ids]))
    for shard in range(2):
        write_shard(root / "shards" / f"{shard:03d}.tar", [f"{shard}_{k}" for k in range(4)])
    return {
        "csv": [f"data.source.path={root / 'pairs.csv'}"],
        "coco": [f"data.source.annotations_json={root / 'coco.json'}", f"data.source.image_root={images}"],
        "cc3m": [f"data.source.metadata_npy={root / 'cc3m.npy'}", f"data.source.image_root={images}"],
        "cc12m": [f"data.source.metadata_npy={root / 'cc12m.npy'}", f"data.source.image_root={images}"],
        "redcaps": [f"data.source.combined_json={root / 'redcaps.json'}",
                    f"data.source.image_root={root / 'redcaps'}"],
        "yfcc15m": [f"data.source.metadata_pickle={root / 'yfcc15m.pkl'}", f"data.source.zip_root={root / 'yfcc'}"],
        "webdataset": [f"data.stream.urls='{root / 'shards'}/{{000..001}}.tar'", "data.stream.samples_per_epoch=8"],
        "synthetic": [],
    }


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    return make_tiny_datasets(tmp_path_factory.mktemp("datasets"))


def test_every_data_config_is_covered(tiny_data: dict[str, list[str]]) -> None:
    assert sorted(tiny_data) == DATA


@pytest.mark.parametrize("data", DATA)
def test_every_data_config_yields_slip_views(tiny_data: dict[str, list[str]], data: str) -> None:
    cfg = compose_config("loss=slip", "model=tiny", f"data={data}", *tiny_data[data], "run_name=x")
    transform = build(cfg.augment, "augment")(inputs=("image", "text", "aug1", "aug2"), image_size=32,
                                              mean=(0.5,) * 3, std=(0.5,) * 3, context_length=16)
    if "stream" in cfg.data:
        sample = next(iter(build(cfg.data.stream, "data.stream", transform=transform)))
    else:
        sample = ImageTextDataset(build(cfg.data.source, "data.source"), transform)[0]
    assert sample["image"].shape == sample["aug1"].shape == (3, 32, 32)
    assert sample["text"].shape == (16,) and sample["_skipped"] == {}


@pytest.mark.parametrize("data", ["csv", "webdataset"])
def test_training_runs_on_file_datasets(tiny_data: dict[str, list[str]], data: str, tmp_path: Path) -> None:
    synthetic_only = ("data.source.num_samples",)
    overrides = [*(o for o in FAST if not o.startswith(synthetic_only)), f"data={data}", *tiny_data[data], "data.batch_size=2", "data.num_workers=0",
                 "trainer.max_steps=2", "loss=slip"]
    results = train(compose_config(*overrides), tmp_path)
    assert results["finished"] and results["step"] == 2


def test_required_data_path_is_named(tmp_path: Path) -> None:
    overrides = [o for o in FAST if not o.startswith("data.source")]
    with pytest.raises(ConfigError, match=r"^data\.source\.path: required"):
        train(compose_config(*overrides, "data=csv"), tmp_path)


def test_shipped_configs_have_no_python_side_defaults() -> None:
    """Each trainer key in the YAML is a TrainerSettings field and vice versa: no hidden defaults."""
    yaml_keys = set(OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")) - {"_target_"}
    assert yaml_keys == set(TrainerSettings.__dataclass_fields__)


def test_too_many_bad_samples_stop_the_run_naming_examples(tmp_path: Path) -> None:
    from slip.app.engine import TrainingError

    write_image(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    rows = ["images/ok.png,fine"] * 40 + [f"images/gone{i}.png,missing" for i in range(40)]
    rows += ["images/broken.png,bad"] * 40
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    overrides = [o for o in FAST if not o.startswith("data.source")]
    cfg = compose_config(*overrides, "data=csv", f"data.source.path={tmp_path / 'pairs.csv'}", "data.batch_size=8",
                         "data.num_workers=0", "trainer.max_steps=20", "trainer.max_bad_fraction=0.5")
    with pytest.raises(TrainingError, match=r"above trainer.max_bad_fraction=0.5.*(gone|broken)") as info:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)


def test_a_key_added_later_at_its_default_does_not_block_resuming() -> None:
    from omegaconf import OmegaConf

    from slip.app.config import first_difference
    from slip.app.migrations import fill_added_defaults

    current = compose_config("model=vit_b16")
    saved = OmegaConf.create(OmegaConf.to_container(current.model))
    del saved["patch_dropout"], saved["ssl_patch_dropout"]  # a config saved before the keys existed
    fill_added_defaults(saved, current.model)
    assert first_difference(saved, current.model, "model") is None
    changed = compose_config("model=vit_b16", "model.patch_dropout=0.5")
    old = OmegaConf.create(OmegaConf.to_container(current.model))
    del old["patch_dropout"]
    fill_added_defaults(old, changed.model)  # not the default: the runs differ
    assert first_difference(old, changed.model, "model") == "model.patch_dropout"


def test_a_section_added_later_at_its_default_does_not_block_resuming() -> None:
    """A run saved before the `teacher` section existed trained as its shipped default does; another value does not
    continue it."""
    from slip.app.migrations import fill_added_defaults

    for overrides, same in (((), True), (("teacher.momentum=0.99",), False), (("teacher.always=true",), False)):
        current = compose_config("run_name=x", *overrides)
        saved = OmegaConf.create(OmegaConf.to_container(current, resolve=False))
        del saved["teacher"]  # a config saved before the section existed
        fill_added_defaults(saved, current)
        assert ("teacher" in saved) == same, overrides
