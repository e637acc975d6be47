"""slip.report: run discovery, swept columns, table values, CSV round trip, the chart PNG, and its errors."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from slip.app.report import build_report, main, parse_overrides
from slip.app.report_chart import chart_metrics

FIXED = ["trainer.max_steps=50", "data.batch_size=8"]  # the same in every run: not a swept column


def write_run(folder: Path, objective: str | None = None, step: int | None = None,
              overrides: list[str] | None = None, train_top1: float | None = None,
              evals: dict[str, list[tuple[str, str, float]]] | None = None, eval_step: int | None = None) -> Path:
    """A run dir: results.json when `objective` is given, eval/<task>.json per entry of `evals`."""
    folder.mkdir(parents=True, exist_ok=True)
    if objective is not None:
        results = {"objective": objective, "step": step, "total_steps": step, "overrides": overrides or [],
                   "zeroshot": None if train_top1 is None else {"top1": train_top1, "top5": 99.0}}
        (folder / "results.json").write_text(json.dumps(results))
    for task, records in (evals or {}).items():
        (folder / "eval").mkdir(exist_ok=True)
        content = {"task": task, "checkpoint": str(folder / "checkpoints" / "last.pt"), "objective": objective,
                   "step": step if eval_step is None else eval_step, "config": {"batch_size": 4},
                   "records": [{"task": task, "dataset": dataset, "metric": metric, "value": value, "n": 3}
                               for dataset, metric, value in records]}
        (folder / "eval" / f"{task}.json").write_text(json.dumps(content))
    return folder


def write_sweep(root: Path) -> None:
    """A Hydra-style multirun of four runs (directory 10 sorts last) with chosen values."""
    write_run(root / "0_loss=clip", "CLIPLoss", 50, ["loss=clip", *FIXED], train_top1=12.34,
              evals={"zeroshot": [("shapes", "top1", 20.04), ("shapes", "top5", 0.1 + 0.2)],
                     "retrieval": [("coco", "image_to_text_R@1", 7.25), ("coco", "text_to_image_R@1", 5.5)]})
    write_run(root / "1_loss=simclr", "SimCLRLoss", 50, ["loss=simclr", *FIXED],
              evals={"linear_probe": [("shapes", "top1", 61.06)], "knn": [("shapes", "top1", 55.55)]})
    write_run(root / "2_loss=slip", "SLIPLoss", 50, ["loss=slip", *FIXED], train_top1=30.0,
              evals={"zeroshot": [("shapes", "top1", 33.36)], "linear_probe": [("shapes", "top1", 64.0)]})
    write_run(root / "10_loss=slip,loss.ssl_scale=0.5", "SLIPLoss", 40,
              ["loss=slip", "loss.ssl_scale=0.5", *FIXED], train_top1=28.96)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / "0_loss=clip" / ".hydra").mkdir()
    (root / "0_loss=clip" / ".hydra" / "results.json").write_text("{}")  # hidden: not a run


def markdown_table(path: Path) -> list[dict[str, str]]:
    """The rows of the Markdown table in `path` as {column: cell text}."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header, _, *rows = ([cell.strip() for cell in line.strip("|").split(" | ")] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(directory, stdout, stderr) of `python -m slip.report` on the sweep, with a title."""
    root = tmp_path_factory.mktemp("sweep")
    write_sweep(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main([str(root), "--title", "Objectives"]) == 0
    return root, out.getvalue(), err.getvalue()


def test_table_lists_runs_swept_parameters_and_metrics(sweep):
    root, printed, warnings = sweep
    assert warnings == ""
    for name in ("report.md", "report.csv", "report.png"):
        assert str(root / name) in printed

    rows = markdown_table(root / "report.md")
    assert list(rows[0]) == [
        "run", "loss", "loss.ssl_scale", "objective", "step",
        "zeroshot/shapes/top1", "zeroshot/shapes/top5", "linear_probe/shapes/top1", "knn/shapes/top1",
        "retrieval/coco/image_to_text_R@1", "retrieval/coco/text_to_image_R@1", "train_zeroshot/top1",
    ]
    assert [row["run"] for row in rows] == ["0_loss=clip", "1_loss=simclr", "2_loss=slip",
                                            "10_loss=slip,loss.ssl_scale=0.5"]
    assert [row["loss"] for row in rows] == ["clip", "simclr", "slip", "slip"]
    assert [row["loss.ssl_scale"] for row in rows] == ["–", "–", "–", "0.5"]
    assert [row["objective"] for row in rows] == ["CLIPLoss", "SimCLRLoss", "SLIPLoss", "SLIPLoss"]
    assert [row["step"] for row in rows] == ["50", "50", "50", "40"]
    assert [row["zeroshot/shapes/top1"] for row in rows] == ["20.0", "–", "33.4", "–"]
    assert [row["zeroshot/shapes/top5"] for row in rows] == ["0.3", "–", "–", "–"]
    assert [row["linear_probe/shapes/top1"] for row in rows] == ["–", "61.1", "64.0", "–"]
    assert [row["retrieval/coco/image_to_text_R@1"] for row in rows] == ["7.2", "–", "–", "–"]
    assert [row["train_zeroshot/top1"] for row in rows] == ["12.3", "–", "30.0", "29.0"]
    assert "Objectives" in (root / "report.md").read_text(encoding="utf-8").splitlines()[0]


def test_csv_keeps_full_precision(sweep):
    with open(sweep[0] / "report.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and rows[3]["run"] == "10_loss=slip,loss.ssl_scale=0.5"
    assert float(rows[0]["zeroshot/shapes/top5"]) == 0.1 + 0.2
    assert float(rows[0]["retrieval/coco/text_to_image_R@1"]) == 5.5
    assert float(rows[1]["knn/shapes/top1"]) == 55.55
    assert float(rows[3]["train_zeroshot/top1"]) == 28.96
    assert rows[1]["zeroshot/shapes/top1"] == "" and rows[0]["loss.ssl_scale"] == ""
    assert [int(row["step"]) for row in rows] == [50, 50, 50, 40]


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """`path` is a PNG of `size` pixels that is not blank."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_chart_is_a_png_of_the_default_size(sweep):
    assert_png(sweep[0] / "report.png", (1200, 600))


def test_chart_is_a_png_of_the_requested_size(tmp_path):
    write_sweep(tmp_path)
    assert main([str(tmp_path), "--size", "640x360", "--out", str(tmp_path / "out")]) == 0
    assert_png(tmp_path / "out" / "report.png", (640, 360))
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.csv").is_file()


def test_chart_metrics_puts_the_headline_metrics_first_and_keeps_eight():
    columns = ["zeroshot/a/top1", "zeroshot/a/top5", "zeroshot/b/top1", "linear_probe/a/top1",
               "linear_probe/a/regularisation", "knn/a/top1", "knn/a/top5", "retrieval/c/image_to_text_R@1",
               "retrieval/c/image_to_text_R@5", "retrieval/c/text_to_image_R@1", "retrieval/c/text_to_image_R@10",
               "train_zeroshot/top1", "custom/a/loss"]
    assert chart_metrics(columns) == [
        "zeroshot/a/top1", "zeroshot/b/top1", "linear_probe/a/top1", "knn/a/top1",
        "retrieval/c/image_to_text_R@1", "retrieval/c/text_to_image_R@1", "train_zeroshot/top1", "zeroshot/a/top5",
    ]
    assert chart_metrics(["linear_probe/a/regularisation", "custom/a/loss"]) == []


def test_a_report_without_chartable_metrics_still_writes_a_png(tmp_path):
    write_run(tmp_path / "a", evals={"custom": [("d", "loss", 0.5)]})
    assert main([str(tmp_path)]) == 0
    assert Image.open(tmp_path / "report.png").size == (1200, 600)
    assert markdown_table(tmp_path / "report.md")[0]["custom/d/loss"] == "0.5"


def test_eval_only_runs_take_objective_and_step_from_their_eval_files(tmp_path):
    write_run(tmp_path / "official", objective=None, step=None,
              evals={"knn": [("shapes", "top1", 41.0)]})
    (tmp_path / "official" / "eval" / "knn.json").write_text(json.dumps({
        "task": "knn", "checkpoint": "x.pt", "objective": "CLIPLoss", "step": 7, "config": {},
        "records": [{"task": "knn", "dataset": "shapes", "metric": "top1", "value": 41.0}]}))
    report = build_report(tmp_path)
    assert [(run.name, run.objective, run.step, run.metrics) for run in report.runs] == [
        ("official", "CLIPLoss", 7, {"knn/shapes/top1": 41.0})]
    assert report.swept == [] and report.warnings == []


def test_a_single_run_in_the_given_dir_has_no_swept_columns(tmp_path):
    write_run(tmp_path, "CLIPLoss", 5, ["loss=clip"], train_top1=10.0)
    report = build_report(tmp_path)
    assert report.header == ["run", "objective", "step", "train_zeroshot/top1"]
    assert report.rows() == [[".", "CLIPLoss", 5, 10.0]]


def test_overrides_parse_into_keys_and_values():
    assert parse_overrides(["loss=clip", "+trainer.extra=a=b", "++x=1", "~data.foo"]) == {
        "loss": "clip", "trainer.extra": "a=b", "x": "1", "~data.foo": ""}


def test_corrupt_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    write_sweep(tmp_path)
    broken = tmp_path / "1_loss=simclr" / "eval" / "knn.json"
    broken.write_text('{"task": "knn", "records": [')
    write_run(tmp_path / "3_broken", evals={"knn": []})
    (tmp_path / "3_broken" / "eval" / "knn.json").write_bytes(b"\xff\xfe not json")
    bad_record = tmp_path / "2_loss=slip" / "eval" / "zeroshot.json"
    content = json.loads(bad_record.read_text())
    content["records"].append({"task": "zeroshot", "dataset": "shapes", "metric": "top5", "value": "high"})
    bad_record.write_text(json.dumps(content))

    assert main([str(tmp_path)]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 4 and all(line.startswith("slip.report: warning: ") for line in warnings)
    assert f"{broken}: unreadable JSON" in warnings[0]
    assert f"{tmp_path / '2_loss=slip' / 'eval' / 'zeroshot.json'}: records[1]" in warnings[1]
    assert f"{tmp_path / '3_broken' / 'eval' / 'knn.json'}: unreadable JSON" in warnings[2]
    assert f"{tmp_path / '3_broken'}: nothing readable" in warnings[3]
    rows = markdown_table(tmp_path / "report.md")
    assert [row["run"] for row in rows] == ["0_loss=clip", "1_loss=simclr", "2_loss=slip",
                                            "10_loss=slip,loss.ssl_scale=0.5"]
    assert "knn/shapes/top1" not in rows[1] and rows[1]["linear_probe/shapes/top1"] == "61.1"
    assert rows[2]["zeroshot/shapes/top1"] == "33.4"


def test_a_step_mismatch_between_training_and_eval_is_reported(tmp_path):
    write_run(tmp_path / "run", "CLIPLoss", 100, ["loss=clip"], evals={"knn": [("d", "top1", 1.0)]}, eval_step=60)
    report = build_report(tmp_path)
    assert report.runs[0].step == 100
    assert report.warnings == [f"{tmp_path / 'run' / 'eval' / 'knn.json'}: step 60 differs from the training's "
                               "step 100"]


def test_no_runs_is_a_one_line_error_naming_the_dir(tmp_path, capsys):
    (tmp_path / "empty" / "eval").mkdir(parents=True)
    (tmp_path / "empty" / "notes.json").write_text("{}")
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == f"slip.report: error: {tmp_path / 'empty'}: no runs found (no results.json or eval/*.json below it)\n"
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"slip.report: error: {tmp_path / 'nowhere'}: no such directory\n"


def test_only_unreadable_runs_is_an_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[1, 2]")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 1 runs has readable results" in err
    assert f"{tmp_path / 'run' / 'results.json'}: expected a JSON object, got list" in err


def test_a_bad_size_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--size", "wide"])
    assert exit_info.value.code == 2 and "expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_the_downstream_view_shows_each_datasets_own_metric_in_the_papers_order(tmp_path):
    from slip.app.report import build_report, downstream_table, main

    write_run(tmp_path / "0_clip", "CLIPLoss", 10, evals={"zeroshot": [
        ("imagenet", "top1", 30.0), ("imagenet", "top5", 55.0), ("pets", "top1", 40.0),
        ("pets", "mean_per_class", 38.0), ("food101", "top1", 50.0), ("mine", "top1", 10.0),
        ("voc2007", "11point_map", 20.0), ("cub200", "top1", 5.0)]})
    write_run(tmp_path / "1_slip", "SLIPLoss", 10, evals={"zeroshot": [
        ("imagenet", "top1", 35.0), ("pets", "mean_per_class", 44.0), ("pets", "top1", 45.0)],
        "knn": [("imagenet", "top1", 20.0)], "linear_probe": [("voc2007", "11point_map", 60.0)]})
    header, rows = downstream_table(build_report(tmp_path))
    # SLIP's table order (food101, cub200, ..., pets, ..., imagenet), then CLIP's voc2007, then others by name.
    assert header == ["run", "food101", "cub200", "pets (mean_per_class)", "imagenet", "voc2007 (11point_map)",
                      "mine", "mean"]
    assert rows[0] == ["0_clip", 50.0, 5.0, 38.0, 30.0, 20.0, 10.0, pytest.approx((50 + 5 + 38 + 30 + 20 + 10) / 6)]
    assert rows[1] == ["1_slip", None, None, 44.0, 35.0, None, None, pytest.approx((44 + 35) / 2)]
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "downstream.md").read_text()
    zeroshot, linear_probe = text.split("## zeroshot")[1].split("## linear_probe")
    assert ("| run | food101 | cub200 | pets (mean_per_class) | imagenet | voc2007 (11point_map) | mine | mean |"
            in zeroshot)
    assert "| 1_slip | – | – | 44.0 | 35.0 | – | – | 39.5 |" in zeroshot
    assert "| run | voc2007 (11point_map) | mean |" in linear_probe and "| 1_slip | 60.0 | 60.0 |" in linear_probe
    assert "knn" not in text
