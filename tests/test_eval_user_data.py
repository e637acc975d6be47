"""python -m slip.eval on a user's own files: a catalog file chosen by name from --config-dir, a CSV list whose images
live under an image root, the zero-shot record's templates, and the probe's validation split by groups."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data_helpers import write_image
from slip.app.config import ConfigError
from slip.app.evaluate import evaluate
from slip.checkpoint import save_model
from slip.models import tiny
from train_helpers import CONF_DIR, run_eval_cli

CLASSES = ["red", "green", "blue"]
# Fast settings for every run below: a small batch, a short probe, kNN with few neighbours, no retrieval.
FAST = ["batch_size=32", "linear_probe.max_iter=20", "linear_probe.refinements=0", "knn.k=4", "tasks.retrieval=[]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two run directories (a sweep), each with a tiny untrained image-text model as checkpoints/last.pt."""
    root = tmp_path_factory.mktemp("runs")
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        save_model(tiny(vision_layers=1, text_layers=1).eval(), root / name / "checkpoints" / "last.pt")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/…/shapes: images/<object>/<view>.png (3 classes x 6 objects x 3 views for train, 3 x 2 x 2 for test), lists
    train.csv and test.csv (filepath relative to images/, label, object) beside them, and classes.json with two
    templates."""
    root = tmp_path_factory.mktemp("shapes")
    for split, objects, views in (("train", 6, 3), ("test", 2, 2)):
        rows = ["filepath,label,object"]
        for label, name in enumerate(CLASSES):
            for number in range(objects):
                obj = f"{split}-{name}-{number}"
                for view in range(views):
                    color = [30 + 20 * number + 5 * view] * 3
                    color[label] = 200
                    write_image(root / "images" / obj / f"{view}.png", color=tuple(color))
                    rows.append(f"{obj}/{view}.png,{name},{obj}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES,
                                                   "templates": ["a photo of a {} thing.", "a {} shape."]}))
    return root


def catalog_file(conf: Path, name: str, data: Path, classes: str, keep_shipped: bool = True) -> Path:
    """conf/catalog/<name>.yaml: the README's worked example, one LabelledCsvDataset entry `name` per split."""
    splits = "".join(f"  {split}:\n    _target_: slip.data.labelled.LabelledCsvDataset\n"
                     f"    path: {data / f'{split}.csv'}\n    image_root: {data / 'images'}\n"
                     f"    classes: {classes}\n" for split in ("train", "test"))
    defaults = "defaults:\n  - default\n  - _self_\n\n" if keep_shipped else ""
    path = conf / "catalog" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{defaults}{name}:\n  metric: top1\n  prompts: null\n{splits}")
    return path


def eval_config(*overrides: str, config_dir: Path | None = None) -> DictConfig:
    """The eval config as `python -m slip.eval [--config-dir DIR] <overrides>` composes it."""
    search = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[*search, *overrides])


def records(out: Path, task: str) -> dict[str, dict]:
    """{metric: record} of a task's results file."""
    return {record["metric"]: record for record in json.loads((out / f"{task}.json").read_text())["records"]}


def test_the_worked_example_a_catalog_file_chosen_by_name_from_a_config_dir(
        runs: Path, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    catalog_file(tmp_path / "my_conf", "shapes", shapes, str(shapes / "classes.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_eval_cli("--config-dir", "my_conf", "catalog=shapes",
                              f"checkpoint={runs / 'a'}", "tasks.zeroshot=[shapes]", "tasks.linear_probe=[shapes]",
                              "tasks.knn=[shapes]", "linear_probe.val_groups=object", *FAST, cwd=tmp_path,
                              monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert not [w for w in caught if "prompt templates" in str(w.message)]  # classes.json brings its templates
    out = runs / "a" / "eval"
    zero_shot = records(out, "zeroshot")
    assert set(zero_shot) == {"top1"} and zero_shot["top1"]["dataset"] == "shapes"
    assert (zero_shot["top1"]["templates"], zero_shot["top1"]["first_template"]) == (2, "a photo of a {} thing.")
    assert set(records(out, "linear_probe")) == {"top1", "val_top1"} and set(records(out, "knn")) == {"top1"}
    settings = json.loads((out / "linear_probe.json").read_text())["settings"]["shapes"]
    assert settings["linear_probe"]["val_groups"] == "object"
    assert settings["catalog"]["train"]["image_root"] == str(shapes / "images")
    # The file's `defaults: [default, _self_]` keeps the shipped entries beside the user's.
    assert "synthetic" in eval_config("checkpoint=x", "catalog=shapes", config_dir=tmp_path / "my_conf").catalog


def test_a_catalog_file_without_defaults_joins_the_shipped_one_as_a_list(shapes: Path, tmp_path: Path) -> None:
    catalog_file(tmp_path / "my_conf", "mine", shapes, str(shapes / "classes.json"), keep_shipped=False)
    alone = eval_config("checkpoint=x", "catalog=mine", config_dir=tmp_path / "my_conf").catalog
    both = eval_config("checkpoint=x", "catalog=[default,mine]", config_dir=tmp_path / "my_conf").catalog
    assert list(alone) == ["mine"] and {"synthetic", "imagenet", "mine"} <= set(both)


def test_a_plain_class_list_is_recorded_with_its_single_template_and_warned_about_once(
        runs: Path, shapes: Path, tmp_path: Path) -> None:
    catalog_file(tmp_path / "my_conf", "plain", shapes, "[red, green, blue]")
    config = eval_config(f"checkpoint={runs}", "catalog=plain", "tasks.zeroshot=[plain]", "tasks.linear_probe=[]",
                         "tasks.knn=[]", *FAST, config_dir=tmp_path / "my_conf")
    with pytest.warns(UserWarning) as caught:
        written = evaluate(config)
    assert len(written) == 2  # two checkpoints, one warning
    messages = [str(warning.message) for warning in caught if "prompt templates" in str(warning.message)]
    assert messages == ["catalog.plain: its class names bring no prompt templates, so zero-shot uses only "
                        "'a photo of a {}.'; give a JSON file {\"classes\": [...], \"templates\": [...]} or a "
                        "built-in prompt set for more"]
    for run in ("a", "b"):
        record = records(runs / run / "eval", "zeroshot")["top1"]
        assert (record["templates"], record["first_template"]) == (1, "a photo of a {}.")


def test_val_groups_by_column_or_path_keeps_the_feature_cache_and_bad_keys_are_named(
        runs: Path, shapes: Path, tmp_path: Path) -> None:
    catalog_file(tmp_path / "my_conf", "shapes", shapes, str(shapes / "classes.json"))
    cache, out = tmp_path / "cache", tmp_path / "out"

    def probe(*overrides: str) -> dict[str, dict]:
        evaluate(eval_config(f"checkpoint={runs / 'a'}", "catalog=shapes", f"feature_cache={cache}",
                             f"output_dir={out}", "tasks.zeroshot=[]", "tasks.linear_probe=[shapes]", "tasks.knn=[]",
                             "tasks.retrieval=[]", *FAST, *overrides, config_dir=tmp_path / "my_conf"))
        return records(out, "linear_probe")

    probe()
    stamps = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    by_column = probe("linear_probe.val_groups=object")
    by_folder = probe("linear_probe.val_groups=path:0")  # images/<object>/<view>.png: the object's folder
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == stamps  # features reused as they were
    assert [by_column["top1"][key] for key in ("value", "l2")] == [by_folder["top1"][key] for key in ("value", "l2")]
    for overrides, message in [
        (["linear_probe.val_groups=domain"],
         r"^linear_probe\.val_groups: catalog\.shapes\.train: .*train\.csv: no column 'domain'; available columns: "
         r"'filepath', 'label', 'object'$"),
        (["linear_probe.val_groups=path:4"],
         r"^linear_probe\.val_groups: catalog\.shapes\.train: path:4: image 0 \(train-red-0/0\.png\) has 2 path "
         r"components, no component 4$"),
        (["linear_probe.val_groups=label", "linear_probe.val_fraction=0.9"],
         r"^linear_probe\.val_groups: catalog\.shapes\.train: 3 groups cannot give a validation share of 0\.9 and "
         r"keep one to fit$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            probe(*overrides)
    with pytest.raises(ConfigError, match=r"^linear_probe\.val_groups: catalog\.synthetic\.train: "
                                          r"SyntheticClassification lists no image paths or columns to group by$"):
        evaluate(eval_config(f"checkpoint={runs / 'a'}", f"output_dir={out}", "tasks.zeroshot=[]", "tasks.knn=[]",
                             "linear_probe.val_groups=object", *FAST))
