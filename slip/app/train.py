"""python -m slip.train: compose the config, build model, objective and data, and hand them to the engine."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from slip.checkpoint import CheckpointError
from slip.app.config import CONF_DIR, ConfigError, build, first_difference
from slip.app.eval_settings import ValSettings
from slip.app.migrations import check_renamed_keys, check_renamed_overrides, fill_added_defaults, upgrade_saved_config
from slip.app.override_keys import check_override_keys
from slip.app.train_data import TrainData, build_train_data
from slip.data.decode import DataError
from slip.distributed import (WorldInfo, convert_sync_batchnorm, init_process_group, leave_process_group, make_gather,
                              resolve_device)
from slip.app.engine import Trainer, TrainerSettings, TrainingError
from slip.error_text import last_line
from slip.eval.zeroshot import validation_images, zero_shot_evaluator
from slip.host_memory import retain_freed_memory
from slip.inputs import is_global_view
from slip.losses import Objective
from slip.models import ImageTextModel
from slip.models.spec import ModelSpec
from slip.models.vision import has_batch_statistics
from slip.random_state import seed_everything
from slip.app.run_identity import BatchLayout, check_resume, checkpoint_to_resume, saved_processes
from slip.app.run_layout import CONFIG_FILE, RESULTS_FILE, latest_checkpoint
from slip.app.run_record import run_record, write_text
from slip.app.task import TrainTask


def _resume_checkpoint(setting: str, run_dir: Path, cfg: DictConfig, processes: int,
                       relayout_reason: str | None) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to continue from, per trainer.resume ('auto', 'never' or a path), after the run-identity
    check (`slip.app.run_identity.check_resume`)."""
    found = checkpoint_to_resume(setting, run_dir)
    if found is None:
        return None
    checkpoint, path = found
    saved = upgrade_saved_config(OmegaConf.create(checkpoint.get("config") or "{}"))
    fill_added_defaults(saved, cfg)
    check_resume(saved, cfg, saved_processes(checkpoint), processes, relayout_reason, path)
    return checkpoint, path


def _finished_results(run_dir: Path, cfg: DictConfig, checkpoint: dict[str, Any] | None,
                      total_steps: int) -> dict[str, Any] | None:
    """The results of this run when it is finished and validated under today's `val` settings (nothing to do);
    None when there is training or validation left. A checkpoint past `total_steps` stops with the key to raise."""
    if checkpoint is None:
        return None
    step = int(checkpoint["state"]["step"])
    if step > total_steps:
        key = "trainer.max_steps" if cfg.trainer.max_steps is not None else "trainer.epochs"
        raise ConfigError(f"{key}: the run is at step {step} ({latest_checkpoint(run_dir)}), past the "
                          f"{total_steps} steps now asked for; raise it or use another run_name")
    results_path, config_path = run_dir / RESULTS_FILE, run_dir / CONFIG_FILE
    if step < total_steps or not results_path.exists():
        return None
    try:
        results = json.loads(results_path.read_text())
        # The val settings the results were scored with; results of earlier versions lack them, and their
        # config.yaml was written with the results (it is written at the start of every invocation now).
        scored_with = (results["val_settings"] if "val_settings" in results
                       else OmegaConf.create(config_path.read_text()).get("val"))
    except (OSError, ValueError, KeyError):
        return None
    same_validation = first_difference(scored_with, cfg.get("val"), "val") is None
    if results.get("step") == step and results.get("validation") != "pending" and same_validation:
        return results
    return None


def check_global_crop_size(augment: DictConfig, spec: ModelSpec, inputs: tuple[str, ...]) -> None:
    """A one-line ConfigError naming augment.ssl_crop_size where the image tower cannot embed global views of that
    size (checked where `inputs` name a global view)."""
    size = augment.get("ssl_crop_size")
    if size is None or not any(is_global_view(name) for name in inputs):
        return
    try:
        spec.vision.check_crop_size(size, spec.preprocess.image_size)
    except ValueError as error:
        raise ConfigError(f"augment.ssl_crop_size: {error}") from None


@dataclass
class RunParts:
    """Everything `train` builds from a config before it trains: the pieces the engine is handed."""

    objective: Objective
    model: ImageTextModel
    transform: Any  # the view recipe (`slip.data.transforms.MultiView`)
    data: TrainData
    total_steps: int
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]
    evaluate: Any  # the zero-shot evaluator, or None


def build_run(cfg: DictConfig, world: WorldInfo, settings: TrainerSettings) -> RunParts:
    """Check and build every node of a training config (`settings`: its built trainer node), in the order that
    fixes the random initialisation."""
    seed_everything(settings.seed, world)
    objective = build(cfg.loss, "loss")
    model = build(cfg.model, "model", inputs=list(objective.inputs))
    spec = model.spec
    objective.bind(spec)
    transform = build(cfg.augment, "augment")(
        inputs=objective.inputs, image_size=spec.preprocess.image_size, mean=spec.preprocess.mean,
        std=spec.preprocess.std, context_length=spec.text.context_length,
    )
    check_global_crop_size(cfg.augment, spec, objective.inputs)
    device = resolve_device(settings.device, world.local_rank)
    data = build_train_data(cfg.data, transform, world, settings.seed, settings.update_freq,
                            pin_memory=device.type == "cuda",  # page-locked batches: asynchronous copies
                            max_bad_in_a_row=settings.max_bad_in_a_row)
    total_steps = settings.max_steps or settings.epochs * data.steps_per_epoch
    optimizer = build(cfg.optim, "optim")([model, objective])  # grouped by optim.decay_embeddings
    schedule = build(cfg.schedule, "schedule")(total_steps=total_steps, steps_per_epoch=data.steps_per_epoch)
    evaluate = None
    if cfg.get("val") and "text" in objective.inputs:  # zero-shot needs a text tower (not SimCLR's)
        val: ValSettings = build(cfg.val, "val", _recursive_=False)
        val_dataset = build(val.dataset, "val.dataset")
        try:
            limit = validation_images(val.max_images, len(val_dataset),
                                      total_steps * settings.update_freq * data.global_batch)
        except ValueError as error:
            raise ConfigError(f"val.max_images: {error}") from None
        evaluate = zero_shot_evaluator(val_dataset, val.prompts, "val.prompts", val.batch_size, max_images=limit)
    return RunParts(objective, model, transform, data, total_steps, optimizer, schedule, evaluate)


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns the results that are also written to results.json in `run_dir`."""
    started = time.perf_counter()
    check_renamed_keys(cfg)
    world = WorldInfo.from_env()
    settings = build(cfg.trainer, "trainer")
    if settings.retain_freed_memory:
        retain_freed_memory()
    parts = build_run(cfg, world, settings)
    objective, model, total_steps, evaluate = parts.objective, parts.model, parts.total_steps, parts.evaluate
    relayout_reason = ("the image tower's BatchNorm normalises each micro-batch with its own statistics"
                       if has_batch_statistics(model.visual) else None)
    found = _resume_checkpoint(settings.resume, run_dir, cfg, world.world_size, relayout_reason)
    checkpoint, checkpoint_path = found if found is not None else (None, None)
    done = _finished_results(run_dir, cfg, checkpoint, total_steps)
    if done is not None:
        if world.is_main:
            print(f"slip.train: the run in {run_dir} finished all {total_steps} steps and is validated; nothing to "
                  f"do (results in {run_dir / RESULTS_FILE})", file=sys.stderr)
        return done

    init_process_group(world)
    objective.set_gather(make_gather(world))
    if world.is_distributed:  # the SSL head's and any predictor's BatchNorm see the global batch
        for part in (model.image_mlp, objective):
            if part is not None:
                convert_sync_batchnorm(part)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    teacher = build(cfg.teacher, "teacher").teacher_for(model, objective, total_steps)
    task = TrainTask(model, objective, model.spec.preprocess.mean, model.spec.preprocess.std, teacher)
    trainer = Trainer(task, parts.optimizer, parts.schedule, settings, world, run_dir,
                      total_steps, parts.data.steps_per_epoch, OmegaConf.to_yaml(cfg, resolve=True), evaluate)
    if checkpoint is not None:
        trainer.resume(checkpoint_path, checkpoint)
        trainer.monitor.message(f"resumed from step {trainer.state.step} ({checkpoint_path})")
    if cfg.get("val") and evaluate is None:
        trainer.monitor.message(f"no zero-shot validation: {type(objective).__name__} trains no text tower "
                                "(evaluate it with python -m slip.eval: linear probe, kNN)")
    layout = BatchLayout.of(cfg, world.world_size)
    trainer.monitor.message(f"data: {parts.data.summary}")
    trainer.monitor.message(f"run dir {run_dir}: {total_steps} steps of global batch {layout.describe()}, "
                            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    if world.is_main:  # a run that crashes or is preempted still documents itself
        write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(parts.data.loader, parts.transform.to_device)
    except (TrainingError, DataError) as error:
        if world.is_main:  # the stop is recorded: the results file names the error and the step that is saved
            _write_run_files(run_dir, cfg, _results(cfg, trainer, evaluate, started, overrides, error))
        raise
    results = _results(cfg, trainer, evaluate, started, overrides)
    if world.is_main:
        _write_run_files(run_dir, cfg, results)
        if results["validation"] == "done":
            chance = 100.0 / len(evaluate.class_names) if evaluate is not None else float("nan")
            trainer.monitor.message(f"zero-shot top-1 on the held-out split: {trainer.last_eval['top1']:.1f}% "
                                    f"(chance {chance:.1f}%), results in {run_dir / RESULTS_FILE}")
    leave_process_group(world)
    return results


def _results(cfg: DictConfig, trainer: Trainer, evaluate: Any, started: float, overrides: list[str] | None,
             error: BaseException | None = None) -> dict[str, Any]:
    """What results.json says of the run: its objective, where it stands, its closing validation, its history."""
    validated = trainer.validated_step == trainer.state.step
    return {
        "objective": trainer.task.objective.label(),
        # "pending": the closing validation has not scored the weights of `step` yet; running again does it.
        "validation": "none" if evaluate is None else "done" if validated else "pending",
        "zeroshot": trainer.last_eval if validated else {},
        "val_settings": OmegaConf.to_container(cfg.val, resolve=True) if cfg.get("val") is not None else None,
        **run_record(trainer, started, overrides, error),
    }


def _write_run_files(run_dir: Path, cfg: DictConfig, results: dict[str, Any]) -> None:
    """Replace config.yaml and results.json, each atomically."""
    write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    write_text(run_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: known errors end the run with one line on stderr, without a stack trace."""
    try:
        hydra_config = HydraConfig.get()
        train(cfg, Path(hydra_config.runtime.output_dir), list(hydra_config.overrides.task))
    except (ConfigError, TrainingError, CheckpointError, DataError, FileNotFoundError) as error:
        print(f"slip.train: error: {last_line(error)}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """Console entry point: a renamed or unknown key, or an unknown group option, on the command line stops with
    one line before Hydra reads it."""
    try:
        check_renamed_overrides(sys.argv[1:])
        check_override_keys(CONF_DIR, "train", sys.argv[1:])
    except ConfigError as error:
        print(f"slip.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
