"""python -m slip.train: a few steps on synthetic data, exact resume, preemption, config errors, multirun, DDP."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from slip.checkpoint import read_checkpoint
from slip.pretrained import load_pretrained_with_info
from slip.app.config import ConfigError
from slip.app.run_layout import CHECKPOINT_IN_RUN
from slip.app.train import train
from rank_helpers import free_port
from train_helpers import (CONF_DIR, EXACT_RUN, FAST, SMALL_VIT, assert_same_run, compose_config, losses_by_step,
                           subprocess_env, weights_of)


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m slip.train args` in `cwd`."""
    return subprocess.run([sys.executable, "-m", "slip.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(**(env or {})))


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*FAST, *SMALL_VIT, "loss=slip", "trainer.max_steps=6", "trainer.save_every=0"]
    full = train(compose_config(*overrides), tmp_path / "full")
    first = train(compose_config(*overrides, "trainer.stop_after=3"), tmp_path / "split")
    assert first["step"] == 3 and not first["finished"]
    second = train(compose_config(*overrides), tmp_path / "split")
    assert second["finished"] and second["step"] == 6
    full_losses = losses_by_step(full)
    assert losses_by_step(second) == {**losses_by_step(first), **losses_by_step(second)}  # history survives
    resumed = losses_by_step(second)
    assert sorted(resumed) == sorted(full_losses) == list(range(1, 7))
    for step, loss in full_losses.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    want = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    got = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert want["state"] == got["state"]
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-5, atol=1e-6)


def test_views_finished_on_the_device_train_as_the_views_finished_in_the_workers(tmp_path: Path) -> None:
    overrides = [*FAST, "loss=slip", "trainer.max_steps=3", "trainer.save_every=0", "trainer.log_images=true"]
    in_workers = train(compose_config(*overrides), tmp_path / "tensor")
    on_device = train(compose_config(*overrides, "augment.backend=device", "data.num_workers=1"), tmp_path / "device")
    want, got = losses_by_step(in_workers), losses_by_step(on_device)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), f"step {step}"


def test_training_checkpoint_loads_as_a_pretrained_model(tmp_path: Path) -> None:
    train(compose_config(*FAST, "loss=clip", "trainer.max_steps=2"), tmp_path)
    model, info = load_pretrained_with_info(tmp_path / "checkpoints" / "last.pt")
    assert not model.training and model.image_mlp is None
    assert (info.format, info.objective, info.step) == ("slip", "CLIPLoss", 2)
    config = (tmp_path / "config.yaml").read_text()
    assert "slip.losses.CLIPLoss" in config and "${" not in config


def test_an_objective_without_text_trains_with_the_default_validation_configured(tmp_path: Path) -> None:
    results = train(compose_config(*FAST, "loss=simclr", "val=synthetic", "val.dataset.num_samples=24",
                                   "trainer.max_steps=1"), tmp_path)
    assert results["finished"] and not results["zeroshot"]


PRE_BUILDER_CHECKPOINT = Path(__file__).parent / "fixtures" / "pre_data_builder_step3.pt"


def test_a_checkpoint_written_before_the_data_builder_resumes_exactly(tmp_path: Path) -> None:
    # The fixture is what the code before slip.data.build_train_data saved at step 3 of these overrides, weights and
    # optimizer state left out (size): position, random states, history and the config in the old layout (`data`
    # without its _target_, augment.ssl_scale).
    overrides = [*FAST, "loss=slip", "data.source.num_samples=32", "trainer.max_steps=6", "trainer.save_every=0"]
    full = train(compose_config(*overrides), tmp_path / "full")
    train(compose_config(*overrides, "trainer.stop_after=3"), tmp_path / "split")
    old = torch.load(PRE_BUILDER_CHECKPOINT, map_location="cpu", weights_only=False)
    saved = OmegaConf.create(old["config"])
    assert "_target_" not in saved.data and "ssl_scale" in saved.augment
    path = tmp_path / "split" / "checkpoints" / "last.pt"
    today = read_checkpoint(path)
    assert today["state"] == old["state"]  # the same position: epoch 0, 3 of its 4 steps, 24 samples
    for new_step, old_step in zip(today["history"], old["history"], strict=True):
        assert new_step["loss"] == pytest.approx(old_step["loss"], rel=1e-3)  # other CPUs round differently
    torch.save({**today, **{key: old[key] for key in ("state", "rng", "config", "history")}}, path)
    resumed = train(compose_config(*overrides), tmp_path / "split")
    assert resumed["finished"] and sorted(losses_by_step(resumed)) == list(range(1, 7))
    for step in (4, 5, 6):
        assert losses_by_step(resumed)[step] == pytest.approx(losses_by_step(full)[step], rel=1e-5), f"step {step}"


def test_refuses_to_overwrite_an_existing_run_unless_resuming(tmp_path: Path) -> None:
    train(compose_config(*FAST, "trainer.max_steps=1"), tmp_path)
    with pytest.raises(ConfigError, match="trainer.resume"):
        train(compose_config(*FAST, "trainer.max_steps=1", "trainer.resume=never"), tmp_path)


def test_resume_with_a_different_config_names_the_key(tmp_path: Path) -> None:
    train(compose_config(*FAST, "trainer.max_steps=2", "trainer.stop_after=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"^optim\.lr: differs"):
        train(compose_config(*FAST, "trainer.max_steps=2", "optim.lr=0.1"), tmp_path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=-1", "trainer.max_steps"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model.vision_width=wide", "model.vision_width"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("optim.eps=-1", "optim.eps"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=eight", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.num_workers=1.5", "data.num_workers"),
        ("+data.batchsize=8", "data.batchsize"),
        ("data.source.num_samples=4", "data.batch_size"),  # fewer samples than one global batch
        ("+augment.ssl_scale=[0.2,1.0]", "augment.ssl_scale: renamed to augment.ssl_crop_scale"),
        ("+model.colour=red", "model.colour"),
        ("loss.ssl_scale=-1", "loss"),
        ("augment.jitter_p=2", "augment"),
        ("trainer.accumulation=sum", "trainer.accumulation"),
        ("model.ssl_head_norm=group", "model.ssl_head_norm"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(tmp_path: Path, override: str, key: str) -> None:
    overrides = [*FAST, "loss=slip", override]
    with pytest.raises(ConfigError) as info:
        train(compose_config(*overrides), tmp_path)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_a_renamed_key_on_the_command_line_stops_with_one_line_naming_the_new_key(tmp_path: Path) -> None:
    result = run_cli(*FAST, "augment.ssl_scale=[0.2,1.0]", f"output_root={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("slip.train: error: augment.ssl_scale: renamed to augment.ssl_crop_scale (the "
                                     "SSL views' crop-area range; loss.ssl_scale is the SSL loss weight)")


def cli_in_process(*args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[object, str]:
    """`slip.train`'s console entry point (`slip.app.train.cli`, what `python -m slip.train ARGS` runs) in this
    process, as a command line that stops: its exit code and stderr. The logging setup Hydra installs for a run is
    undone afterwards. test_a_renamed_key_on_the_command_line_stops_with_one_line_naming_the_new_key runs the command
    itself in a subprocess."""
    from slip.app.train import cli

    monkeypatch.setattr(sys, "argv", ["slip.train", *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as info:
            cli()
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "named"),
    [("model=vit_nope", "vit_nope"), ("trainer.max_step=3", "trainer.max_step"), ("trainer.epochs=many", "many")],
)
def test_command_line_errors_are_short(tmp_path: Path, override: str, named: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    # In process as in a subprocess, Hydra prints an unexpected error's traceback to stderr and exits 1.
    code, stderr = cli_in_process(*FAST, override, f"output_root={tmp_path}", monkeypatch=monkeypatch, capsys=capsys)
    assert code != 0
    assert named in stderr.strip().splitlines()[0]
    assert "Traceback" not in stderr


def train_until(args: list[str], cwd: Path, seen_enough, timeout: float = 180) -> tuple[subprocess.Popen, list[str]]:
    """Start `python -m slip.train ARGS` in a session of its own; read its output until a line satisfies
    `seen_enough` (or `timeout` seconds pass); the process (still running) and the lines read."""
    process = subprocess.Popen([sys.executable, "-m", "slip.train", *args], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               env=subprocess_env())
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if seen_enough(line) or time.monotonic() > deadline:
            break
    return process, seen


def test_sigterm_to_the_process_group_saves_and_exits_resumably(tmp_path: Path) -> None:
    """As under SLURM preemption, the DataLoader worker gets SIGTERM too; the run must still save and exit."""
    args = [*FAST, "trainer.max_steps=10000", "trainer.save_every=0", "data.source.num_samples=100000",
            "data.num_workers=1", f"output_root={tmp_path}"]
    process, seen = train_until(args, tmp_path, lambda line: line.startswith("step 2/"))
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    text = "".join(seen) + output
    assert process.returncode == 0, text
    assert "saved step" in text
    checkpoint = read_checkpoint(tmp_path / "test" / "checkpoints" / "last.pt")
    assert 2 <= checkpoint["state"]["step"] < 10000


def test_multirun_writes_sibling_run_directories(tmp_path: Path) -> None:
    result = run_cli("-m", "loss=clip,simclr,slip", *FAST, "trainer.max_steps=2", f"output_root={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = sorted((tmp_path / "multirun").glob("*/*/results.json"))
    assert len(results) == 3
    objectives = sorted(json.loads(path.read_text())["objective"] for path in results)
    assert objectives == ["CLIPLoss", "SLIPLoss", "SimCLRLoss"]
    (sweep,) = {path.parent.parent for path in results}
    names = sorted(path.parent.name for path in results)
    assert [name[:2] for name in names] == ["0_", "1_", "2_"] and not any("=" in name for name in names)
    assert [name.endswith(suffix) or f"+{suffix}+" in name for name, suffix in
            zip(names, ("loss-clip", "loss-simclr", "loss-slip"))] == [True] * 3
    # The sweep dir goes straight to evaluation and the comparison report. slip.eval's settings as on its command
    # line, run in this process (the command itself runs in test_multilabel.py and in the SIGTERM test below); the
    # probe's l2 sweep cut to its grid, 20 iterations a fit, as test_eval.py's: the table only needs its numbers.
    from slip.app.evaluate import evaluate
    from test_eval import eval_config

    small = ["catalog.synthetic.train.num_samples=48", "catalog.synthetic.test.num_samples=24",
             "catalog.synthetic_captions.test.num_samples=16", "knn.k=5", "linear_probe.max_iter=20",
             "linear_probe.refinements=0"]
    evaluated = evaluate(eval_config(f"checkpoint={sweep}", *small))
    assert len(evaluated) == 3
    reported = subprocess.run([sys.executable, "-m", "slip.report", str(sweep)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=subprocess_env())
    assert reported.returncode == 0, reported.stderr[-2000:]
    table = (sweep / "report.md").read_text()
    assert all(f"loss-{name}" in table or name in table for name in ("clip", "simclr", "slip"))
    assert "linear_probe/synthetic/top1" in table and "zeroshot/synthetic/top1" in table
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_process_gloo_run_matches_one_process_and_continues_on_one_process_exactly(
        tmp_path: Path, exact_run_at_batch_8: tuple[dict[int, float], dict]) -> None:
    """2 gloo processes at batch 4 for 3 steps, then 1 process at batch 8 (the same global batch, so the run's
    identity allows it): every loss and the final weights equal one process throughout, in float64."""
    common = [*EXACT_RUN, f"output_root={tmp_path}"]
    one_losses, one_weights = exact_run_at_batch_8  # one process at batch 8 throughout (conftest.py)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "slip.train", *common, "data.batch_size=4", "trainer.stop_after=3"]
    double = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(OMP_NUM_THREADS="1"))
    assert double.returncode == 0, double.stderr[-3000:]
    run_dir = tmp_path / "test"
    two = json.loads((run_dir / "results.json").read_text())
    assert sorted(losses_by_step(two)) == [1, 2, 3] and read_checkpoint(run_dir / CHECKPOINT_IN_RUN)["processes"] == 2
    resumed = train(compose_config(*common, "data.batch_size=8"), run_dir)
    assert_same_run(losses_by_step(resumed), weights_of(run_dir), one_losses, one_weights)


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    # What `python -m slip.train hydra/launcher=slurm hydra.launcher.nodes=4 ... --cfg hydra` prints: the hydra node.
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=4", *FAST],
                      return_hydra_config=True)
    printed = OmegaConf.to_yaml(cfg.hydra)
    assert "SlurmLauncher" in printed and "nodes: 4" in printed


def test_runs_under_the_submitit_launcher(tmp_path: Path) -> None:
    """The SLURM launcher's code path, with submitit's local executor standing in for the cluster."""
    result = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *FAST,
                     "trainer.max_steps=1", f"output_root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (results,) = (tmp_path / "multirun").glob("*/*/results.json")
    assert json.loads(results.read_text())["finished"]


def test_tensorboard_gets_losses_lr_throughput_and_the_view_grid(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_config(*FAST, "loss=slip", "trainer.max_steps=2", "trainer.log_images=true"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc", "lr", "logit_scale", "images_per_second",
                "data_wait_fraction", "peak_memory_mib"):
        assert f"train/{tag}" in scalars
    assert events.Tags()["images"] == ["views"]
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]


def test_sigterm_during_validation_stops_within_seconds_and_the_run_validates_when_run_again(tmp_path: Path) -> None:
    args = [*FAST, "trainer.max_steps=2", "val=synthetic", "val.max_images=all", "val.dataset.num_samples=200000",
            "val.batch_size=50", f"output_root={tmp_path}"]
    process, seen = train_until(args, tmp_path, lambda line: "zero-shot validation on 200000 images" in line)
    time.sleep(1.0)  # well inside the validation, which takes minutes
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    stopped_after = time.monotonic() - signalled
    print(f"stopped {stopped_after:.1f} s after SIGTERM")  # shown with pytest -s
    text = "".join(seen) + output
    assert process.returncode == 0, text
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert "validation at step 2 stopped by SIGTERM" in text and "run again to validate" in text
    assert read_checkpoint(tmp_path / "test" / "checkpoints" / "last.pt")["state"]["step"] == 2
    interrupted = json.loads((tmp_path / "test" / "results.json").read_text())
    assert interrupted["finished"] and interrupted["validation"] == "pending" and interrupted["zeroshot"] == {}
    # Run again: in this process, what the command runs for this run directory (its start-up aside); its console.
    again = io.StringIO()
    with contextlib.redirect_stdout(again), contextlib.redirect_stderr(again):
        train(compose_config(*FAST, "trainer.max_steps=2", "val=synthetic", "val.max_images=all",
                             "val.dataset.num_samples=48", f"output_root={tmp_path}"), tmp_path / "test")
    validated = json.loads((tmp_path / "test" / "results.json").read_text())
    assert "top1" in validated["zeroshot"] and validated["validation"] == "done"
    assert "validation: 48/48 images" in again.getvalue()


def test_auto_validation_scores_no_more_images_than_the_run_trains_on(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    results = train(compose_config(*FAST, "trainer.max_steps=2", "val=synthetic"), tmp_path)
    assert results["finished"] and results["validation"] == "done"
    result = capsys.readouterr()
    assert "step 2: zero-shot validation on 96 images" in result.out + result.err  # 16 trained, at least 96


# Prints "extracting N images" as slip.eval starts extracting the features of N images, so that the test below knows
# when the extraction is under way (in the process started by `python -m slip.eval`, through PYTHONPATH).
EXTRACTION_MARKER = """
import slip.eval.features as _features
_extract = _features.extract_features
def _marked(model, dataset, *args, **kwargs):
    print(f"extracting {len(dataset)} images", flush=True)
    return _extract(model, dataset, *args, **kwargs)
_features.extract_features = _marked
"""


def test_sigterm_during_feature_extraction_stops_within_seconds_and_leaves_no_partial_cache(tmp_path: Path) -> None:
    from slip.app.evaluate import evaluate
    from test_eval import eval_config

    train(compose_config(*FAST, "loss=clip", "trainer.max_steps=1"), tmp_path / "run")
    base = [f"checkpoint={tmp_path / 'run'}", "tasks.zeroshot=[]", "tasks.knn=[]", "tasks.retrieval=[]",
            "catalog.synthetic.test.num_samples=24"]
    injected = tmp_path / "inject"
    injected.mkdir()
    (injected / "sitecustomize.py").write_text(EXTRACTION_MARKER)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(injected), env["PYTHONPATH"]])
    process = subprocess.Popen([sys.executable, "-m", "slip.eval", *base, "catalog.synthetic.train.num_samples=400000"],
                               cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    seen = []
    for line in process.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if line.startswith("extracting 400000 images"):
            break
    time.sleep(1.0)  # well inside extracting 400,000 images, which takes many minutes
    assert process.poll() is None, "".join(seen) + process.communicate()[0]
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=60)
    assert time.monotonic() - signalled < 15 and process.returncode != 0  # killed, not minutes later
    cache = tmp_path / "run" / "eval" / "feature_cache"
    assert not any(path.name.endswith(".tmp") for path in cache.rglob("*")) if cache.exists() else True
    # Run again (in this process: slip.eval's settings, as its command line gives them) on a smaller train split,
    # the probe's l2 sweep cut to its grid, 20 iterations a fit, as test_eval.py's.
    evaluate(eval_config(*base, "catalog.synthetic.train.num_samples=48", "linear_probe.max_iter=20",
                         "linear_probe.refinements=0"))
    assert (tmp_path / "run" / "eval").is_dir()
