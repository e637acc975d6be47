"""python -m slip.finetune: fine-tune a checkpoint's image tower end to end on a labelled catalog dataset.

The run is a training run like `slip.train`'s, on the same engine (`slip.app.engine.Trainer`) with another task
(`slip.app.finetune_task.FinetuneTask`): run dir, atomic checkpoints, exact resume, SIGTERM, AMP, torchrun/DDP,
TensorBoard and progress are the engine's. Its test-split scores go to the run's results.json and, once the last
step is scored, to the source checkpoint's evaluation folder (`finetune.json` beside slip.eval's task files), where
`slip.report` reads them as the "finetune" column.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from slip.app.config import CONF_DIR, ConfigError, build
from slip.app.engine import Trainer, TrainerSettings, TrainingError
from slip.app.evaluate import catalog_split, default_output_dir
from slip.app.finetune_settings import ClassifierSettings, FinetuneData, TestSettings
from slip.app.finetune_task import FinetuneTask
from slip.app.override_keys import check_override_keys
from slip.app.run_identity import BatchLayout, check_resume, checkpoint_to_resume, saved_processes
from slip.app.run_layout import CONFIG_FILE, RESULTS_FILE, latest_checkpoint, run_dir_of
from slip.app.run_record import run_record, write_text
from slip.app.train_data import plan_train_data
from slip.checkpoint import CheckpointError
from slip.classifier import classifier_from_model, layer_decay_groups
from slip.data.classification import ClassificationSample, LabelledSource, check_labelled, eval_transform
from slip.data.dataset import ImageTextDataset
from slip.data.decode import DataError
from slip.distributed import WorldInfo, init_process_group, leave_process_group, resolve_device
from slip.error_text import last_line
from slip.eval.classification import ClassifierEvaluator
from slip.eval.features import checkpoint_fingerprint
from slip.eval.metrics import check_metric
from slip.host_memory import retain_freed_memory
from slip.models.vision import has_batch_statistics
from slip.pretrained import load_pretrained_with_info
from slip.random_state import seed_everything

__all__ = ["FINETUNE_FREE_KEYS", "FINETUNE_IDENTITY_SECTIONS", "finetune", "source_checkpoint"]

# Config sections that define what a fine-tuning run trains (compared whole on resume), and those that may change.
FINETUNE_IDENTITY_SECTIONS = ("source", "weights", "dataset", "classifier", "data", "augment", "mixup",
                              "label_smoothing", "optim", "schedule")
FINETUNE_FREE_KEYS = ("checkpoint", "test", "catalog", "data_root", "output_root", "run_name", "trainer")
RECORDS_FILE = "finetune.json"  # in the source checkpoint's evaluation folder


def source_checkpoint(setting: str) -> Path:
    """The checkpoint `checkpoint=` names: a run dir's checkpoints/last.pt, or the file or model directory."""
    path = Path(setting)
    return (latest_checkpoint(path) or path) if path.is_dir() else path


def default_run_dir(output_root: str, dataset: str, source: Path, weights: str) -> Path:
    """<output_root>/finetune/<dataset>/<the source's run name>-<hash of its path>[-ema]: one run per source, its
    weights and dataset."""
    run_dir = run_dir_of(source)
    name = run_dir.name if run_dir is not None else source.name
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return Path(output_root) / "finetune" / dataset / (f"{name}-{digest}" + ("" if weights == "model" else
                                                                              f"-{weights}"))


def _resume(run_dir: Path, cfg: DictConfig, settings: TrainerSettings, processes: int,
            relayout_reason: str | None) -> tuple[dict[str, Any], Path] | None:
    """The run's checkpoint to continue from (trainer.resume: auto, never or a path), after the identity check."""
    found = checkpoint_to_resume(settings.resume, run_dir)
    if found is None:
        return None
    checkpoint, path = found
    if checkpoint.get("classifier") is None:
        raise ConfigError(f"trainer.resume: {path} is not a fine-tuning checkpoint")
    saved = OmegaConf.create(checkpoint.get("config") or "{}")
    check_resume(saved, cfg, saved_processes(checkpoint), processes, relayout_reason, path,
                 FINETUNE_IDENTITY_SECTIONS)
    return checkpoint, path


def _as_config_error(key: str, action: Any, *args: Any, **kwargs: Any) -> Any:
    """`action(*args, **kwargs)`, its ValueError as a one-line ConfigError naming `key`."""
    try:
        return action(*args, **kwargs)
    except ValueError as error:
        raise ConfigError(f"{key}: {last_line(error)}") from None


def finetune(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the results also written to the run's results.json."""
    started = time.perf_counter()
    world = WorldInfo.from_env()
    settings: TrainerSettings = build(cfg.trainer, "trainer")
    if settings.retain_freed_memory:
        retain_freed_memory()
    seed_everything(settings.seed, world)
    source = source_checkpoint(cfg.checkpoint)
    model, info = load_pretrained_with_info(source, cfg.weights)
    spec = model.spec.preprocess
    name = cfg.dataset
    train_split, test_split = catalog_split(cfg, name, "train"), catalog_split(cfg, name, "test")
    try:
        num_classes = check_labelled(train_split, f"catalog.{name}.train")  # its message names the key
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if list(getattr(test_split, "classes", [])) != list(train_split.classes):
        raise ConfigError(f"catalog.{name}.test: its classes differ from the train split's; fine-tuning scores the "
                          "same classes it learns")
    metric = _as_config_error(f"catalog.{name}.metric", check_metric, cfg.catalog[name].get("metric") or "top1")
    head: ClassifierSettings = build(cfg.classifier, "classifier")
    classifier = _as_config_error("classifier", classifier_from_model, model, num_classes, head.drop_path_rate,
                                  head.head_init_scale)
    groups = _as_config_error("classifier.layer_decay", layer_decay_groups, classifier, cfg.optim.weight_decay,
                              head.layer_decay)
    test: TestSettings = build(cfg.test, "test")
    evaluate = ClassifierEvaluator(test_split, _as_config_error(
        "test.crop_pct", eval_transform, spec.image_size, spec.mean, spec.std, spec.interpolation, test.crop_pct),
        test.batch_size, test.num_workers, metric)
    transform = build(cfg.augment, "augment")(image_size=spec.image_size, mean=spec.mean, std=spec.std)
    data_settings: FinetuneData = build(cfg.data, "data")
    mixup = build(cfg.mixup, "mixup")(num_classes=num_classes) if cfg.get("mixup") else None
    if mixup is not None and data_settings.batch_size % 2:
        raise ConfigError(f"data.batch_size: mixup pairs each batch with its reverse and needs an even batch, got "
                          f"{data_settings.batch_size}")
    dataset = ImageTextDataset(LabelledSource(train_split, f"catalog.{name}.train"), ClassificationSample(transform),
                               seed=settings.seed, max_retries=settings.max_bad_in_a_row)
    device = resolve_device(settings.device, world.local_rank)
    data = plan_train_data(dataset, data_settings.batch_size, data_settings.num_workers, world, settings.seed,
                           settings.update_freq, pin_memory=device.type == "cuda")
    total_steps = settings.max_steps or settings.epochs * data.steps_per_epoch
    optimizer = build(cfg.optim, "optim")(groups)
    schedule = build(cfg.schedule, "schedule")(total_steps=total_steps, steps_per_epoch=data.steps_per_epoch)

    run_dir = (Path(cfg.output_root) / cfg.run_name if cfg.run_name else
               default_run_dir(cfg.output_root, name, source, cfg.weights))
    identity = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # + the source's contents, by hash
    identity.source = {"fingerprint": checkpoint_fingerprint(source)}
    reasons = [reason for reason, applies in (
        ("mixup pairs the samples of each process's micro-batch", mixup is not None),
        ("the image tower's BatchNorm normalises each micro-batch with its own statistics",
         has_batch_statistics(classifier.tower))) if applies]
    found = _resume(run_dir, identity, settings, world.world_size, "; ".join(reasons) or None)
    init_process_group(world)
    task = FinetuneTask(classifier, mixup, cfg.label_smoothing, spec.mean, spec.std)
    config_text = OmegaConf.to_yaml(identity, resolve=True)  # the checkpoint's and config.yaml's
    trainer = Trainer(task, optimizer, schedule, settings, world, run_dir, total_steps, data.steps_per_epoch,
                      config_text, evaluate)
    if found is not None:
        trainer.resume(*found[::-1])
        trainer.monitor.message(f"resumed from step {trainer.state.step} ({found[1]})")
    layout = BatchLayout.of(cfg, world.world_size)
    trainer.monitor.message(
        f"run dir {run_dir}: fine-tuning {source} ({info.objective or info.format}) on {name}, {num_classes} "
        f"classes, {len(train_split)} training images, {total_steps} steps of global batch {layout.describe()}")
    if world.is_main:
        write_text(run_dir / CONFIG_FILE, config_text)
    error: BaseException | None = None
    try:
        trainer.fit(data.loader)
    except (TrainingError, DataError) as caught:
        error = caught
    results = _results(trainer, cfg, source, info, started, overrides, error)
    if world.is_main:
        write_text(run_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        if results["validation"] == "done":
            records = _write_records(source, cfg, info, run_dir, results)
            trainer.monitor.message(f"fine-tuned on {name}: " + ", ".join(
                f"{key} {value:.1f}" for key, value in results["test"].items()) + f"; recorded in {records}")
    if error is not None:
        raise error
    leave_process_group(world)
    return results


def _results(trainer: Trainer, cfg: DictConfig, source: Path, info: Any, started: float,
             overrides: list[str] | None, error: BaseException | None) -> dict[str, Any]:
    """What results.json says of the run: its source, its test scores, where it stands and its history."""
    validated = trainer.validated_step == trainer.state.step
    return {
        "task": "finetune",
        "source": {"checkpoint": str(source.resolve()), "weights": cfg.weights, "format": info.format,
                   "objective": info.objective, "step": info.step},
        "dataset": cfg.dataset,
        "validation": "done" if validated else "pending",
        "test": trainer.last_eval if validated else {},
        **run_record(trainer, started, overrides, error),
    }


def _write_records(source: Path, cfg: DictConfig, info: Any, run_dir: Path, results: dict[str, Any]) -> Path:
    """Put this run's test scores in the source's `finetune.json` (replacing the dataset's earlier records, keeping
    other datasets'), where `slip.report` reads them; returns the file."""
    path = default_output_dir(source, cfg.weights) / RECORDS_FILE
    try:
        stored = json.loads(path.read_text())
        kept = [record for record in stored.get("records", []) if record.get("dataset") != cfg.dataset]
    except (OSError, ValueError, AttributeError):
        kept = []
    header = {"task": "finetune", "checkpoint": str(source.resolve()), "weights": cfg.weights,
              "objective": info.objective, "step": info.step}
    records = kept + [{**header, "dataset": cfg.dataset, "metric": metric, "value": float(value),
                       "finetune_run": str(run_dir.resolve()), "finetune_step": results["step"]}
                      for metric, value in results["test"].items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({**header, "records": records}, indent=2) + "\n")
    return path


@hydra.main(config_path=CONF_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: known errors end the run with one line on stderr, without a stack trace."""
    try:
        finetune(cfg, list(HydraConfig.get().overrides.task))
    except (ConfigError, TrainingError, CheckpointError, DataError, FileNotFoundError) as error:
        print(f"slip.finetune: error: {last_line(error)}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """Console entry point: an unknown key or group option on the command line stops with one line."""
    try:
        check_override_keys(CONF_DIR, "finetune", sys.argv[1:])
    except ConfigError as error:
        print(f"slip.finetune: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
