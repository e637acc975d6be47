"""python -m slip.eval: every task on trained checkpoints, the result files, the feature cache, and bad input."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data_helpers import write_image
from slip.pretrained import load_pretrained
from slip.app.config import ConfigError
from slip.data.synthetic import SyntheticClassification
from slip.data.transforms import eval_view
from slip.eval.features import EvalViewDataset
from slip.eval.metrics import mean_per_class_accuracy
from slip.app.evaluate import evaluate
from slip.eval.zeroshot import ZeroShotEvaluator, text_classifier, zero_shot_scores
from slip.tokenizer import tokenize
from slip.app.train import train
from train_helpers import CONF_DIR, FAST, compose_config, run_eval_cli

# Small catalog entries so that every task runs in seconds.
SMALL = ["catalog.synthetic.train.num_samples=96", "catalog.synthetic.test.num_samples=48",
         "catalog.synthetic_captions.test.num_samples=24", "batch_size=32", "linear_probe.max_iter=20",
         "linear_probe.refinements=0"]


def eval_config(*overrides: str) -> DictConfig:
    """The eval config as `python -m slip.eval <overrides>` composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep-like directory with a 2-step SLIP run and a 2-step SimCLR run."""
    root = tmp_path_factory.mktemp("sweep")
    for number, loss in enumerate(("slip", "simclr")):
        train(compose_config(*FAST, f"loss={loss}", "trainer.max_steps=2"), root / f"{number}_loss-{loss}")
    return root


def read_task(run: Path, task: str) -> dict:
    return json.loads((run / "eval" / f"{task}.json").read_text())


def test_every_task_writes_records_with_checkpoint_objective_and_step(trained_runs: Path) -> None:
    run = trained_runs / "0_loss-slip"
    written = evaluate(eval_config(f"checkpoint={run}", *SMALL))
    checkpoint = run / "checkpoints" / "last.pt"
    assert set(written[checkpoint]) == {"zeroshot", "linear_probe", "knn", "retrieval"}
    for task in written[checkpoint]:
        result = read_task(run, task)
        assert (result["task"], result["objective"], result["step"]) == (task, "SLIPLoss", 2)
        assert result["checkpoint"] == str(checkpoint.resolve()) and result["config"]["tasks"]
        assert result["records"], task
        for record in result["records"]:
            assert record["dataset"] in ("synthetic", "synthetic_captions")
            assert 0.0 <= record["value"] <= 100.0
            assert (record["task"], record["objective"], record["step"]) == (task, "SLIPLoss", 2)
    metrics = {task: {r["metric"] for r in read_task(run, task)["records"]} for task in written[checkpoint]}
    assert {"top1", "top5"} <= metrics["zeroshot"] and {"top1"} <= metrics["knn"]
    assert "top1" in metrics["linear_probe"] and "l2" in read_task(run, "linear_probe")["records"][0]
    assert {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} <= metrics["retrieval"]


def test_zero_shot_record_equals_the_evaluator_on_the_same_data(trained_runs: Path) -> None:
    run = trained_runs / "0_loss-slip"
    evaluate(eval_config(f"checkpoint={run}", *SMALL, "tasks.linear_probe=[]", "tasks.knn=[]",
                         "tasks.retrieval=[]"))
    recorded = {r["metric"]: r["value"] for r in read_task(run, "zeroshot")["records"]}
    model = load_pretrained(run / "checkpoints" / "last.pt")
    direct = ZeroShotEvaluator(SyntheticClassification(num_samples=48, image_size=64, seed=1), 32)(model)
    assert recorded == pytest.approx(direct)


def test_features_are_extracted_once_per_split_and_shared_by_probe_and_knn(trained_runs: Path, tmp_path: Path) -> None:
    run = trained_runs / "0_loss-slip"
    cache = tmp_path / "cache"
    config = eval_config(f"checkpoint={run}", *SMALL, f"feature_cache={cache}", f"output_dir={tmp_path / 'out'}",
                         "tasks.zeroshot=[]", "tasks.retrieval=[]")
    evaluate(config)
    files = sorted(cache.iterdir())
    assert len(files) == 2  # train and test features, read by both the probe and kNN
    stamps = [f.stat().st_mtime_ns for f in files]
    first = json.loads((tmp_path / "out" / "knn.json").read_text())["records"]
    evaluate(config)
    assert [f.stat().st_mtime_ns for f in sorted(cache.iterdir())] == stamps
    assert json.loads((tmp_path / "out" / "knn.json").read_text())["records"] == first


def test_a_directory_evaluates_every_run_and_skips_text_tasks_without_a_text_tower(trained_runs: Path) -> None:
    written = evaluate(eval_config(f"checkpoint={trained_runs}", *SMALL, "tasks.linear_probe=[]"))
    assert len(written) == 2
    simclr = trained_runs / "1_loss-simclr"
    assert set(written[simclr / "checkpoints" / "last.pt"]) == {"knn"}
    assert read_task(simclr, "knn")["objective"] == "SimCLRLoss"


def test_an_unknown_dataset_or_task_names_the_key(trained_runs: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tasks\.knn: 'nope' is not in the catalog"):
        evaluate(eval_config(f"checkpoint={trained_runs}", "tasks.knn=[nope]"))
    with pytest.raises(ConfigError, match=r"^tasks\.segmentation: unknown task"):
        evaluate(eval_config(f"checkpoint={trained_runs}", "+tasks.segmentation=[synthetic]"))
    with pytest.raises(ConfigError, match=r"^retain_freed_memory: expected bool, got 'yes'"):
        evaluate(eval_config(f"checkpoint={trained_runs}", "retain_freed_memory=yes"))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint at all")
    assert "notes.pt" in one_line_error(run_eval_cli(f"checkpoint={tmp_path / 'notes.pt'}", cwd=tmp_path,
                                                     monkeypatch=monkeypatch, capsys=capsys))


def image_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    for index, name in enumerate(classes):
        for item in range(per_class):
            write_image(root / name / f"{item}.png", color=(40 * index, 100, 200 - 40 * item))
    return root


def single_line_error(*overrides: str) -> str:
    """The message of the error that evaluate() stops with; it must be one line."""
    with pytest.raises((ConfigError, ValueError, FileNotFoundError)) as info:
        evaluate(eval_config("tasks.zeroshot=[]", "tasks.linear_probe=[]", "tasks.knn=[]", "tasks.retrieval=[]",
                             *overrides))
    message = str(info.value)
    assert "\n" not in message.strip(), message
    return message


def test_class_names_that_do_not_fit_name_the_prompt_key(trained_runs: Path, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "three", ["a", "b", "c"])
    message = single_line_error(f"checkpoint={trained_runs / '0_loss-slip'}", f"output_dir={tmp_path / 'out'}",
                                f"catalog.cifar10.test.root={root}", "tasks.zeroshot=[cifar10]")
    assert "catalog.cifar10.prompts" in message


def test_an_empty_image_folder_is_named(trained_runs: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    message = single_line_error(f"checkpoint={trained_runs / '0_loss-slip'}", f"output_dir={tmp_path / 'out'}",
                                f"catalog.imagenet.train.root={tmp_path / 'empty'}",
                                f"catalog.imagenet.test.root={tmp_path / 'empty'}", "tasks.knn=[imagenet]")
    assert str(tmp_path / "empty") in message


def test_a_missing_image_of_a_captions_csv_is_named(trained_runs: Path, tmp_path: Path) -> None:
    write_image(tmp_path / "there.png")
    (tmp_path / "captions.csv").write_text("filepath,title\nthere.png,a red square\ngone.png,a lost picture\n")
    message = single_line_error(f"checkpoint={trained_runs / '0_loss-slip'}", f"output_dir={tmp_path / 'out'}",
                                f"catalog.flickr30k.test.path={tmp_path / 'captions.csv'}",
                                "tasks.retrieval=[flickr30k]")
    assert "gone.png" in message


def test_a_catalog_entry_added_on_the_command_line_runs_a_csv_list_with_a_class_names_file(
        trained_runs: Path, tmp_path: Path) -> None:
    rows = []
    for index in range(12):
        label = ["red circle", "blue square", "green triangle"][index % 3]
        write_image(tmp_path / "images" / f"{index}.png", color=[(220, 20, 20), (20, 20, 220), (20, 200, 20)][index % 3])
        rows.append(f"images/{index}.png,{label}\n")
    (tmp_path / "list.csv").write_text("filepath,label\n" + "".join(rows))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["red circle", "blue square", "green triangle"],
                                                       "templates": ["a {}."]}))
    entry = [f"+catalog.mine.{split}._target_=slip.data.labelled.LabelledCsvDataset" for split in ("train", "test")]
    entry += [f"+catalog.mine.{split}.path={tmp_path / 'list.csv'}" for split in ("train", "test")]
    entry += [f"+catalog.mine.{split}.classes={tmp_path / 'classes.json'}" for split in ("train", "test")]
    evaluate(eval_config(f"checkpoint={trained_runs / '0_loss-slip'}", f"output_dir={tmp_path / 'out'}", *entry,
                         "tasks.zeroshot=[mine]", "tasks.linear_probe=[]", "tasks.knn=[mine]", "knn.k=4",
                         "tasks.retrieval=[]"))
    zero_shot = json.loads((tmp_path / "out" / "zeroshot.json").read_text())["records"]
    assert {(r["dataset"], r["metric"]) for r in zero_shot} == {("mine", "top1")}  # 3 classes: no top-5
    assert json.loads((tmp_path / "out" / "knn.json").read_text())["records"][0]["dataset"] == "mine"


def test_each_task_reports_the_catalog_entrys_own_metric(trained_runs: Path) -> None:
    run = trained_runs / "0_loss-slip"
    evaluate(eval_config(f"checkpoint={run}", *SMALL, "catalog.synthetic.metric=mean_per_class",
                         "tasks.retrieval=[]"))
    for task in ("zeroshot", "linear_probe", "knn"):
        metrics = {record["metric"]: record["value"] for record in read_task(run, task)["records"]}
        assert {"mean_per_class", "top1"} <= set(metrics), task
        assert 0.0 <= metrics["mean_per_class"] <= 100.0
    # The zero-shot record is the evaluator's score matrix scored by the metric.
    model = load_pretrained(run / "checkpoints" / "last.pt")
    dataset = SyntheticClassification(num_samples=48, image_size=64, seed=1)
    preprocess = model.spec.preprocess
    images = EvalViewDataset(dataset, eval_view(preprocess.image_size, preprocess.mean, preprocess.std),
                             len(dataset.classes))
    classifier = text_classifier(model, dataset.classes, dataset.templates, tokenize)
    scores, labels = zero_shot_scores(model, classifier, torch.utils.data.DataLoader(images, batch_size=32))
    recorded = {r["metric"]: r["value"] for r in read_task(run, "zeroshot")["records"]}
    assert recorded["mean_per_class"] == pytest.approx(mean_per_class_accuracy(scores, labels)["mean_per_class"])


def test_an_unknown_metric_names_the_catalog_key(trained_runs: Path) -> None:
    with pytest.raises(ConfigError, match=r"^catalog\.synthetic\.metric: unknown metric 'f1'; one of top1"):
        evaluate(eval_config(f"checkpoint={trained_runs / '0_loss-slip'}", *SMALL, "catalog.synthetic.metric=f1",
                             "tasks.retrieval=[]", "tasks.linear_probe=[]", "tasks.knn=[]"))
