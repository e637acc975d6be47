"""Multi-label evaluation data (PASCAL VOC 2007's layout and a CSV form) and the 11-point mAP through zero-shot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_image

from slip.app.config import ConfigError
from slip.data.multilabel import MultiLabelCsvDataset, VocClassificationDataset
from slip.eval.metrics import eleven_point_map

sklearn_metrics = pytest.importorskip("sklearn.metrics")

VOC_OBJECTS = {  # image id -> (class, difficult) objects
    "000001": [("dog", False), ("person", False)],
    "000002": [("cat", False), ("dog", True)],
    "000003": [("car", False), ("car", True)],
    "000004": [("bicycle", True)],
}


VOC_TRAIN_CLASSES = ("dog", "cat", "car", "person", "bicycle")


def write_voc(root: Path, train_images: int = 0) -> Path:
    """A VOCdevkit/VOC2007-like tree: four annotated test images, and `train_images` generated ones listed in
    trainval.txt (each holding one or two classes, their colours following the first class)."""
    objects = dict(VOC_OBJECTS)
    for index in range(train_images):
        first = VOC_TRAIN_CLASSES[index % len(VOC_TRAIN_CLASSES)]
        second = VOC_TRAIN_CLASSES[(index * 3 + 1) % len(VOC_TRAIN_CLASSES)]
        objects[f"1{index:05d}"] = [(first, False)] + ([(second, False)] if index % 3 == 0 else [])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{image_id}\n" for image_id in VOC_OBJECTS))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(
        "".join(f"{image_id}\n" for image_id in objects if image_id not in VOC_OBJECTS))
    (root / "Annotations").mkdir()
    for number, (image_id, image_objects) in enumerate(objects.items()):
        shade = VOC_TRAIN_CLASSES.index(image_objects[0][0]) if image_id not in VOC_OBJECTS else number
        write_image(root / "JPEGImages" / f"{image_id}.jpg", (40 * shade, 90 + number % 7, 160), fmt="JPEG")
        body = "".join(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult></object>"
                       for name, difficult in image_objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    return root


def test_voc_targets_mark_present_absent_and_difficult_only_classes(tmp_path: Path) -> None:
    dataset = VocClassificationDataset(write_voc(tmp_path / "voc"))
    assert len(dataset) == 4 and len(dataset.classes) == 20 and dataset.templates
    column = {name: dataset.classes.index(name) for name in ("dog", "person", "cat", "car", "bicycle")}
    image, targets = dataset[1]
    assert image.mode == "RGB" and targets.shape == (20,)
    assert targets[column["cat"]] == 1 and targets[column["dog"]] == -1 and int((targets != 0).sum()) == 2
    assert dataset[2][1][column["car"]] == 1  # a difficult object beside a plain one of its class: present
    assert dataset[3][1][column["bicycle"]] == -1
    assert dataset[0][1][column["dog"]] == dataset[0][1][column["person"]] == 1


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc")
    (root / "Annotations" / "000002.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(ValueError, match=r"000002\.xml: unknown class 'unicorn'"):
        VocClassificationDataset(root)
    with pytest.raises(FileNotFoundError, match=r"val\.txt: no such image list"):
        VocClassificationDataset(root, split="val")


def test_a_csv_of_label_sets(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, (10, 20, 30))
    (tmp_path / "labels.csv").write_text("filepath,labels\na.png,cat;dog\nb.png,\n")
    dataset = MultiLabelCsvDataset(tmp_path / "labels.csv", ["cat", "dog", "car"])
    assert dataset[0][1].tolist() == [1, 1, 0] and dataset[1][1].tolist() == [0, 0, 0]
    (tmp_path / "bad.csv").write_text("filepath,labels\na.png,cow\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 2: unknown class 'cow'"):
        MultiLabelCsvDataset(tmp_path / "bad.csv", ["cat", "dog", "car"])


def test_ignored_images_are_left_out_of_their_class_only() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    targets = (torch.rand(40, 3, generator=generator) < 0.4).long()
    targets[::5, 1] = -1
    want = []
    for column in range(3):
        kept = (targets[:, column] >= 0).numpy()
        precision, recall, _ = sklearn_metrics.precision_recall_curve(targets[kept, column].numpy(),
                                                                      scores[kept, column].numpy())
        precision, recall = precision[:-1], recall[:-1]
        want.append(np.mean([precision[recall >= t / 10].max() if (recall >= t / 10).any() else 0.0
                             for t in range(11)]))
    assert eleven_point_map(scores, targets)["11point_map"] == pytest.approx(100 * np.mean(want), abs=1e-9)


def test_zero_shot_scores_a_voc_stand_in_with_its_11_point_map(tmp_path: Path) -> None:
    from slip.checkpoint import save_model
    from slip.app.evaluate import evaluate
    from slip.models import build_vit_model
    from test_eval import eval_config

    torch.manual_seed(0)
    model = build_vit_model(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                            embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=16,
                            inputs=("image", "text"))
    save_model(model, tmp_path / "model.pt")
    root = write_voc(tmp_path / "voc")
    entry = ["+catalog.vocmini.test._target_=slip.data.multilabel.VocClassificationDataset",
             f"+catalog.vocmini.test.root={root}", "+catalog.vocmini.prompts=voc2007",
             "+catalog.vocmini.metric=11point_map"]
    written = evaluate(eval_config(f"checkpoint={tmp_path / 'model.pt'}", *entry, "tasks.zeroshot=[vocmini]",
                                   "tasks.linear_probe=[]", "tasks.knn=[]", "tasks.retrieval=[]"))
    records = json.loads(Path(written[tmp_path / "model.pt"]["zeroshot"]).read_text())["records"]
    assert [record["metric"] for record in records] == ["11point_map"] and 0 <= records[0]["value"] <= 100
    with pytest.raises(ConfigError, match=r"^tasks\.knn: catalog\.vocmini is multi-label"):
        evaluate(eval_config(f"checkpoint={tmp_path / 'model.pt'}", *entry, "tasks.zeroshot=[]", "tasks.knn=[vocmini]",
                             "tasks.linear_probe=[]", "tasks.retrieval=[]"))
    with pytest.raises(ConfigError, match=r"^linear_probe\.method: catalog\.vocmini is multi-label, which only lbfgs"):
        evaluate(eval_config(f"checkpoint={tmp_path / 'model.pt'}", *entry, "tasks.zeroshot=[]", "tasks.knn=[]",
                             "tasks.linear_probe=[vocmini]", "linear_probe.method=sgd", "tasks.retrieval=[]"))
    with pytest.raises(ConfigError, match=r"^catalog\.vocmini\.metric: 'top1' cannot score a multi-label dataset; "
                                          r"use 11point_map$"):
        evaluate(eval_config(f"checkpoint={tmp_path / 'model.pt'}", *entry[:-1], "+catalog.vocmini.metric=top1",
                             "tasks.zeroshot=[vocmini]", "tasks.knn=[]", "tasks.linear_probe=[]", "tasks.retrieval=[]"))
    with pytest.raises(ConfigError, match=r"^catalog\.synthetic\.metric: '11point_map' cannot score a single-label"):
        evaluate(eval_config(f"checkpoint={tmp_path / 'model.pt'}", "catalog.synthetic.metric=11point_map",
                             "tasks.zeroshot=[synthetic]", "tasks.knn=[]", "tasks.linear_probe=[]",
                             "tasks.retrieval=[]"))


def test_a_tiny_model_through_slip_eval_and_slip_report_with_every_metric_kind(tmp_path: Path) -> None:
    import subprocess
    import sys

    from slip.checkpoint import save_model
    from slip.models import build_vit_model
    from slip.report import main as report_main
    from train_helpers import subprocess_env

    torch.manual_seed(0)
    save_model(build_vit_model(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                               embed_dim=16, text_width=32, text_layers=1, text_heads=2, context_length=16,
                               inputs=("image", "text")), tmp_path / "model.pt")
    voc = write_voc(tmp_path / "voc", train_images=20)
    for index in range(8):  # a binary stand-in for Hateful Memes
        write_image(tmp_path / "binary" / f"{index}.png", (30 * index, 200 - 20 * index, 90))
    (tmp_path / "binary" / "test.csv").write_text(
        "filepath,label\n" + "".join(f"{index}.png,{('cat', 'dog')[index % 2]}\n" for index in range(8)))
    synthetic = ["test._target_=slip.data.synthetic.SyntheticClassification", "test.num_samples=48",
                 "test.image_size=32", "test.seed=1", "prompts=null"]
    catalog = [*(f"+catalog.per_class.{item}" for item in synthetic), "+catalog.per_class.metric=mean_per_class",
               *(f"+catalog.video.{item}" for item in synthetic), "+catalog.video.metric=mean_top1_top5",
               "+catalog.binary.test._target_=slip.data.labelled.LabelledCsvDataset",
               f"+catalog.binary.test.path={tmp_path / 'binary' / 'test.csv'}", "+catalog.binary.test.classes=[cat,dog]",
               "+catalog.binary.prompts=null", "+catalog.binary.metric=roc_auc",
               f"catalog.voc2007.test.root={voc}", f"catalog.voc2007.train.root={voc}",
               "catalog.synthetic.test.num_samples=48", "linear_probe.refinements=0", "linear_probe.max_iter=20"]
    run = tmp_path / "runs" / "tiny"
    evaluated = subprocess.run(
        [sys.executable, "-m", "slip.eval", f"checkpoint={tmp_path / 'model.pt'}", f"output_dir={run / 'eval'}",
         *catalog, "tasks.zeroshot=[synthetic,per_class,video,binary,voc2007]", "tasks.linear_probe=[voc2007]",
         "tasks.knn=[]", "tasks.retrieval=[]"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    # slip.report's entry point in this process (test_train.py's multirun test runs the command itself).
    assert report_main([str(tmp_path / "runs")]) == 0
    table = (tmp_path / "runs" / "downstream.md").read_text()
    assert ("| run | voc2007 (11point_map) | binary (roc_auc) | per_class (mean_per_class) | synthetic | "
            "video (mean_top1_top5) | mean |") in table
    zeroshot, linear_probe = table.split("## zeroshot")[1].split("## linear_probe")
    row = next(line for line in zeroshot.splitlines() if line.startswith("| tiny |"))
    assert "–" not in row and len(row.split("|")) == 9
    assert "| run | voc2007 (11point_map) | mean |" in linear_probe
    records = json.loads((run / "eval" / "linear_probe.json").read_text())["records"]
    assert {record["metric"] for record in records} == {"11point_map", "val_11point_map"}
