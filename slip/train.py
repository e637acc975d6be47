"""python -m slip.train: compose the config, build model, objective and data, and hand them to the engine."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from slip.checkpoint import CheckpointError, read_checkpoint
from slip.config import (ConfigError, build, check_renamed_keys, check_renamed_overrides, fill_added_defaults,
                         first_difference, upgrade_saved_config)
from slip.data import build_train_data
from slip.data.decode import DataError
from slip.distributed import WorldInfo, convert_sync_batchnorm, init_process_group, leave_process_group, make_gather
from slip.engine import Trainer, TrainingError, TrainTask, resolve_device, seed_everything
from slip.eval.zeroshot import validation_images, zero_shot_evaluator
from slip.host_memory import retain_freed_memory
from slip.optim import param_groups
from slip.run_layout import CHECKPOINT_IN_RUN, RESULTS_FILE

# Sections that define what is trained; a resumed run must agree with its checkpoint on all of them.
RUN_DEFINING_SECTIONS = ("model", "loss", "data", "augment", "optim", "schedule")


def _resume_checkpoint(setting: str, run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint to continue from, per trainer.resume ('auto', 'never' or a path), after a config check."""
    latest = run_dir / CHECKPOINT_IN_RUN
    if setting == "never":
        if latest.exists():
            raise ConfigError(f"trainer.resume: {latest} exists and resume=never would overwrite it; "
                              "use trainer.resume=auto or another run_name")
        return None
    path = latest if setting == "auto" else Path(setting)
    if setting == "auto" and not latest.exists():
        return None
    checkpoint = read_checkpoint(path)
    saved = upgrade_saved_config(OmegaConf.create(checkpoint.get("config") or "{}"))
    fill_added_defaults(saved, cfg)
    for section in RUN_DEFINING_SECTIONS:
        difference = first_difference(saved.get(section), cfg.get(section), section)
        if difference is not None:
            raise ConfigError(f"{difference}: differs from the checkpoint {path}; "
                              "resume with the same config or use another run_name")
    return checkpoint


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns the results that are also written to results.json in `run_dir`."""
    started = time.perf_counter()
    check_renamed_keys(cfg)
    world = WorldInfo.from_env()
    settings = build(cfg.trainer, "trainer")
    if settings.retain_freed_memory:
        retain_freed_memory()
    seed_everything(settings.seed, world)

    objective = build(cfg.loss, "loss")
    model = build(cfg.model, "model", inputs=list(objective.inputs))
    arch = model.arch
    transform = build(cfg.augment, "augment")(
        inputs=objective.inputs, image_size=arch["image_size"], mean=arch["image_mean"], std=arch["image_std"],
        context_length=arch["context_length"],
    )
    device = resolve_device(settings.device, world)
    data = build_train_data(cfg.data, transform, world, settings.seed, settings.update_freq,
                            pin_memory=device.type == "cuda")  # page-locked batches: asynchronous copies
    steps_per_epoch = data.steps_per_epoch
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    optimizer = build(cfg.optim, "optim")([model, objective])  # grouped by optim.decay_embeddings
    schedule = build(cfg.schedule, "schedule")(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    evaluate = None
    if cfg.get("val") and "text" in objective.inputs:  # zero-shot needs a text tower (not SimCLR's)
        val_dataset = build(cfg.val.dataset, "val.dataset")
        try:
            limit = validation_images(cfg.val.get("max_images", "all"), len(val_dataset),
                                      total_steps * settings.update_freq * data.global_batch)
        except ValueError as error:
            raise ConfigError(f"val.max_images: {error}") from None
        evaluate = zero_shot_evaluator(val_dataset, cfg.val.get("prompts"), "val.prompts", int(cfg.val.batch_size),
                                       max_images=limit)
    checkpoint = _resume_checkpoint(settings.resume, run_dir, cfg)

    init_process_group(world)
    objective.set_gather(make_gather(world))
    if world.is_distributed and model.image_mlp is not None:
        convert_sync_batchnorm(model.image_mlp)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainer = Trainer(TrainTask(model, objective), optimizer, schedule, settings, world, run_dir, total_steps,
                      steps_per_epoch, OmegaConf.to_yaml(cfg, resolve=True), evaluate)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        trainer.monitor.message(f"resumed from step {trainer.state.step} ({run_dir / CHECKPOINT_IN_RUN})")
    if cfg.get("val") and evaluate is None:
        trainer.monitor.message(f"no zero-shot validation: {type(objective).__name__} trains no text tower "
                                "(evaluate it with python -m slip.eval: linear probe, kNN)")
    trainer.monitor.message(f"run dir {run_dir}: {total_steps} steps of global batch {data.global_batch}, "
                            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    state = trainer.fit(data.loader, arch["image_mean"], arch["image_std"], transform.to_device)
    results = {
        "objective": cfg.loss._target_.rsplit(".", 1)[-1],
        "step": state.step,
        "total_steps": total_steps,
        "finished": state.step >= total_steps,
        "zeroshot": trainer.last_eval,
        "skipped_samples": state.skipped,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "overrides": list(overrides or []),
        "history": trainer.history,
    }
    if world.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        if trainer.last_eval:
            chance = 100.0 / len(evaluate.class_names) if evaluate is not None else float("nan")
            print(f"zero-shot top-1 on the held-out split: {trainer.last_eval['top1']:.1f}% "
                  f"(chance {chance:.1f}%), results in {run_dir / RESULTS_FILE}")
    leave_process_group(world)
    return results


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: known errors end the run with one line on stderr, without a stack trace."""
    try:
        hydra_config = HydraConfig.get()
        train(cfg, Path(hydra_config.runtime.output_dir), list(hydra_config.overrides.task))
    except (ConfigError, TrainingError, CheckpointError, DataError, FileNotFoundError) as error:
        # Errors re-raised from DataLoader workers carry the worker's traceback; its last line is the message.
        print(f"slip.train: error: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """Console entry point: a renamed or unknown key, or an unknown group option, on the command line stops with
    one line before Hydra reads it."""
    from slip.config import check_override_keys

    try:
        check_renamed_overrides(sys.argv[1:])
        check_override_keys(Path(__file__).resolve().parent.parent / "conf", "train", sys.argv[1:])
    except ConfigError as error:
        print(f"slip.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
