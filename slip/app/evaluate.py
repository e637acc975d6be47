"""Run the configured evaluation tasks on checkpoints and write one results JSON per task."""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from slip.checkpoint import CheckpointInfo
from slip.pretrained import load_pretrained_with_info
from slip.app.config import ConfigError, build
from slip.app.eval_settings import EvalSettings, KnnSettings, LinearProbeSettings
from slip.distributed import resolve_device
from slip.eval.features import FeatureCache, extract_features
from slip.eval.knn import knn_accuracy
from slip.error_text import one_line
from slip.eval.linear_probe import grouped_split, linear_probe, sgd_linear_probe
from slip.eval.metrics import MULTI_LABEL_METRICS, check_metric
from slip.eval.multilabel_probe import multilabel_linear_probe
from slip.eval.retrieval import retrieval_scores
from slip.eval.zeroshot import zero_shot_evaluator
from slip.prompts import load_prompts
from slip.host_memory import retain_freed_memory
from slip.models import ImageTextModel
from slip.sharded_checkpoint import is_sharded_checkpoint
from slip.app.run_layout import CHECKPOINTS_IN_RUN, EVAL_DIR, latest_checkpoint, run_dir_of


def catalog_split(cfg: DictConfig, name: str, split: str) -> Any:
    """Split `split` of catalog entry `name` of `cfg.catalog`, built; a one-line ConfigError naming the entry where
    it is unknown, lacks the split or is empty."""
    entry = cfg.catalog.get(name)
    if entry is None:
        raise ConfigError(f"catalog.{name}: no such dataset in the catalog; known: {', '.join(cfg.catalog)}")
    if entry.get(split) is None:
        raise ConfigError(f"catalog.{name}.{split}: this dataset has no {split} split")
    dataset = build(entry[split], f"catalog.{name}.{split}")
    if len(dataset) == 0:
        raise ConfigError(f"catalog.{name}.{split}: the dataset is empty")
    return dataset


@dataclass
class EvalContext:
    """One loaded checkpoint and the settings every task shares."""

    model: ImageTextModel
    info: CheckpointInfo
    checkpoint: Path
    cfg: DictConfig
    settings: EvalSettings
    probe: LinearProbeSettings
    knn: KnnSettings
    cache: FeatureCache
    fingerprint: str
    built: dict[tuple[str, str], Any] = field(default_factory=dict)  # datasets by (name, split), built once
    warned: set[str] = field(default_factory=set)  # catalog entries already warned about, shared by a run's checkpoints

    def dataset(self, name: str, split: str) -> Any:
        """Split `split` of catalog entry `name` (built on first use: building may list every file)."""
        if (name, split) not in self.built:
            self.built[name, split] = self._build_dataset(name, split)
        return self.built[name, split]

    def _build_dataset(self, name: str, split: str) -> Any:
        return catalog_split(self.cfg, name, split)

    def features(self, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen backbone features and labels of a catalog split, from the cache when present."""
        spec = OmegaConf.to_container(self.cfg.catalog[name][split], resolve=True)
        key = {"checkpoint": self.fingerprint, "dataset": name, "split": split, "spec": spec,
               "image_size": self.model.spec.preprocess.image_size, "kind": "backbone"}
        features, labels = self.cache.load_or_compute(key, lambda: extract_features(
            self.model, self.dataset(name, split), batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers))
        device = next(self.model.parameters()).device
        return features.to(device), labels.to(device)


def _is_multi_label(context: EvalContext, name: str) -> bool:
    """Whether catalog entry `name`'s test split gives each image a set of classes (targets [C])."""
    return bool(getattr(context.dataset(name, "test"), "multi_label", False))


def dataset_metric(context: EvalContext, name: str) -> str:
    """The catalog entry's `metric:` (top1 when unset), checked against DATASET_METRICS and the entry's kind:
    11point_map scores multi-label entries, and only them."""
    metric = context.cfg.catalog[name].get("metric") or "top1"
    try:
        check_metric(metric)
    except ValueError as error:
        raise ConfigError(f"catalog.{name}.metric: {error}") from None
    multi_label = _is_multi_label(context, name)
    if multi_label != (metric in MULTI_LABEL_METRICS):
        kind = "a multi-label" if multi_label else "a single-label"
        fits = " or ".join(MULTI_LABEL_METRICS) if multi_label else "one of the others"
        raise ConfigError(f"catalog.{name}.metric: {metric!r} cannot score {kind} dataset; use {fits}")
    return metric


def _single_label(context: EvalContext, name: str, task: str) -> None:
    """Raise ConfigError naming the task where catalog entry `name` is multi-label (zero-shot and the linear probe
    score those)."""
    if _is_multi_label(context, name):
        raise ConfigError(f"tasks.{task}: catalog.{name} is multi-label; zero-shot and linear_probe score it, "
                          f"{task} does not")


def zero_shot_task(context: EvalContext, name: str) -> dict[str, Any]:
    """Top-1/top-5 (and the entry's own metric) of the text classifier from its class names and templates, with the
    number of templates and the first one; warns once per entry whose class list brought no templates."""
    dataset, prompts = context.dataset(name, "test"), context.cfg.catalog[name].get("prompts")
    evaluator = zero_shot_evaluator(dataset, prompts, f"catalog.{name}.prompts", context.settings.batch_size,
                                    context.settings.num_workers, metric=dataset_metric(context, name))
    defaulted = load_prompts(prompts).default_templates if prompts else getattr(dataset, "default_templates", False)
    if defaulted and name not in context.warned:
        context.warned.add(name)
        warnings.warn(f"catalog.{name}: its class names bring no prompt templates, so zero-shot uses only "
                      f"{evaluator.templates[0]!r}; give a JSON file {{\"classes\": [...], \"templates\": [...]}} or a "
                      "built-in prompt set for more", stacklevel=2)
    return {**evaluator(context.model), "templates": len(evaluator.templates),
            "first_template": evaluator.templates[0]}


def probe_groups(context: EvalContext, name: str) -> list[str] | None:
    """The group of each training image of catalog entry `name` by `linear_probe.val_groups` (None when unset); a
    one-line ConfigError naming the key where the dataset cannot give them or they cannot be split."""
    key = context.probe.val_groups
    if key is None:
        return None
    where = f"linear_probe.val_groups: catalog.{name}.train"
    if _is_multi_label(context, name):
        raise ConfigError(f"{where} is multi-label; its probe's validation split does not take groups")
    dataset = context.dataset(name, "train")
    if not callable(getattr(dataset, "groups", None)):
        raise ConfigError(f"{where}: {type(dataset).__name__} lists no image paths or columns to group by")
    try:
        groups = dataset.groups(key)
        grouped_split(groups, context.probe.val_fraction, context.probe.seed)
    except ValueError as error:
        raise ConfigError(f"{where}: {one_line(error)}") from None
    return groups


def linear_probe_task(context: EvalContext, name: str) -> dict[str, float]:
    """Logistic regression on frozen features (CLIP's L-BFGS protocol, or SLIP's SGD one); one-vs-rest binary
    regressions for a multi-label entry."""
    settings = context.probe
    metric = dataset_metric(context, name)
    multi_label = _is_multi_label(context, name)
    if multi_label and settings.method != "lbfgs":
        raise ConfigError(f"linear_probe.method: catalog.{name} is multi-label, which only lbfgs (one-vs-rest) "
                          f"probes; got {settings.method!r}")
    groups = probe_groups(context, name)
    train_x, train_y = context.features(name, "train")
    test_x, test_y = context.features(name, "test")
    if multi_label:
        result = multilabel_linear_probe(train_x, train_y, test_x, test_y, settings.sweep)
    elif settings.method == "lbfgs":
        result = linear_probe(train_x, train_y, test_x, test_y, len(context.dataset(name, "test").classes),
                              settings.sweep, metric=metric, groups=groups)
    else:
        result = sgd_linear_probe(train_x, train_y, test_x, test_y, len(context.dataset(name, "test").classes),
                                  seed=settings.seed, metric=metric)
    return {key: value for key, value in result.items() if isinstance(value, (int, float))}


def knn_task(context: EvalContext, name: str) -> dict[str, float]:
    """Cosine kNN with temperature-weighted votes on frozen features."""
    _single_label(context, name, "knn")
    train_x, train_y = context.features(name, "train")
    test_x, test_y = context.features(name, "test")
    num_classes = len(context.dataset(name, "test").classes)
    return knn_accuracy(train_x, train_y, test_x, test_y, num_classes, context.knn.vote,
                        metric=dataset_metric(context, name))


def retrieval_task(context: EvalContext, name: str) -> dict[str, float]:
    """Image-to-text and text-to-image recall@1/5/10."""
    return retrieval_scores(context.model, context.dataset(name, "test"), batch_size=context.settings.batch_size,
                            num_workers=context.settings.num_workers)


TASKS: dict[str, Callable[[EvalContext, str], dict[str, Any]]] = {
    "zeroshot": zero_shot_task,
    "linear_probe": linear_probe_task,
    "knn": knn_task,
    "retrieval": retrieval_task,
}
# Tasks that need the joint image-text space; they are skipped for models without a text tower (SimCLR).
TEXT_TASKS = ("zeroshot", "retrieval")
# Values a task returns that are settings it chose, not scores (kept on the records as extras).
CHOSEN_SETTINGS = ("l2",)
# Values a task returns that say how it scored (kept on the records as extras, not printed with the scores).
SCORING_NOTES = ("templates", "first_template")


def find_checkpoints(path: Path) -> list[Path]:
    """A checkpoint file (or sharded checkpoint directory) as is; a run dir's latest checkpoint (checkpoints/last.pt
    or last.dcp); or that of every run dir below a directory."""
    if path.is_file() or is_sharded_checkpoint(path):
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    latest = latest_checkpoint(path)
    if latest is not None:
        return [latest]
    run_dirs = sorted({found.parent.parent for name in CHECKPOINTS_IN_RUN
                       for found in path.glob(f"**/{name.as_posix()}")})
    found = [checkpoint for checkpoint in map(latest_checkpoint, run_dirs) if checkpoint is not None]
    if not found:
        names = " or ".join(map(str, CHECKPOINTS_IN_RUN))
        raise FileNotFoundError(f"{path}: no {names} in this directory or below it")
    return found


def default_output_dir(checkpoint: Path, weights: str = "model") -> Path:
    """<run>/eval for a run's checkpoints/last.pt; <file>.eval beside any other checkpoint file; with a suffix
    "-ema" for the momentum teacher's EMA weights, so that their results never stand in the model's place."""
    suffix = "" if weights == "model" else f"-{weights}"
    run_dir = run_dir_of(checkpoint)
    if run_dir is not None:
        return run_dir / (EVAL_DIR + suffix)
    return checkpoint.with_name(checkpoint.name + ".eval" + suffix)


def _check_tasks(cfg: DictConfig) -> None:
    for task, names in cfg.tasks.items():
        if task not in TASKS:
            raise ConfigError(f"tasks.{task}: unknown task; choose from {', '.join(TASKS)}")
        for name in names or []:
            if name not in cfg.catalog:
                raise ConfigError(f"tasks.{task}: {name!r} is not in the catalog; known: {', '.join(cfg.catalog)}")


def task_settings(cfg: DictConfig, task: str, name: str) -> dict[str, Any]:
    """What a task's results on catalog entry `name` depend on besides the checkpoint: the entry (resolved) and the
    config section named after the task (linear_probe, knn), if any. Batch size, workers and device are left out, as
    the feature cache leaves them out."""
    own = cfg.get(task)
    if isinstance(own, DictConfig):
        own = {key: value for key, value in OmegaConf.to_container(own, resolve=True).items() if key != "_target_"}
    return {"catalog": OmegaConf.to_container(cfg.catalog[name], resolve=True), task: own}


def stored_results(path: Path, fingerprint: str) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """{dataset: (settings, records)} of a task's results file written for the checkpoint with this fingerprint;
    empty when the file is absent, unreadable, of another checkpoint, or from before settings were recorded."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != fingerprint or not isinstance(stored.get("settings"), dict):
            return {}
        return {name: (settings, [r for r in stored["records"] if r.get("dataset") == name])
                for name, settings in stored["settings"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def evaluate_checkpoint(cfg: DictConfig, settings: EvalSettings, probe: LinearProbeSettings, knn: KnnSettings,
                        checkpoint: Path, output_dir: Path | None = None,
                        warned: set[str] | None = None) -> dict[str, Path]:
    """Run every configured task on one checkpoint; returns {task: results file}.

    A dataset whose results file already holds its records for this checkpoint (by content hash) and these
    settings (`task_settings`) is skipped, saying so, unless `overwrite` is true. `warned`: the catalog entries
    already warned about (shared by the checkpoints of one run, so that each warning is given once)."""
    model, info = load_pretrained_with_info(checkpoint, settings.weights)
    model.to(resolve_device(settings.device))
    output_dir = output_dir or default_output_dir(checkpoint, settings.weights)
    cache_dir = Path(settings.feature_cache) if settings.feature_cache else output_dir / "feature_cache"
    cache = FeatureCache(str(cache_dir))
    # The same file holds two models: its EMA weights are another model, for the feature cache and the results.
    fingerprint = cache.fingerprint(checkpoint) + ("" if settings.weights == "model" else f"+{settings.weights}")
    context = EvalContext(model, info, checkpoint, cfg, settings, probe, knn, cache, fingerprint,
                          warned=set() if warned is None else warned)
    written = {}
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("catalog", None)
    for task, names in cfg.tasks.items():
        if not names:
            continue
        if task in TEXT_TASKS and model.text is None:
            print(f"{checkpoint}: {task} skipped: the model has no text tower ({info.objective or 'image only'})",
                  flush=True)
            continue
        header = {"task": task, "checkpoint": str(checkpoint.resolve()), "weights": info.weights,
                  "objective": info.objective, "step": info.step}
        path = output_dir / f"{task}.json"
        stored = {} if settings.overwrite else stored_results(path, context.fingerprint)
        records, recorded, computed = [], {}, False
        for name in names:
            recorded[name] = task_settings(cfg, task, name)
            if name in stored and stored[name][0] == recorded[name]:
                records += stored[name][1]
                print(f"{checkpoint}: skipped {task} on {name}: results for this checkpoint and settings exist in "
                      f"{path}", flush=True)
                continue
            computed = True
            scores = TASKS[task](context, name)
            extras = {key: scores[key] for key in (*CHOSEN_SETTINGS, *SCORING_NOTES) if key in scores}
            records += [{**header, "dataset": name, "metric": metric, "value": float(value), **extras}
                        for metric, value in scores.items() if metric not in extras]
            print(f"{checkpoint}: {task} on {name}: " + ", ".join(
                f"{metric} {value:.4g}" for metric, value in scores.items() if metric not in SCORING_NOTES), flush=True)
        if computed or set(stored) != set(names):
            output_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**header, "fingerprint": context.fingerprint, "config": config,
                                        "settings": recorded, "records": records}, indent=2) + "\n")
        written[task] = path
    return written


def evaluate(cfg: DictConfig) -> dict[Path, dict[str, Path]]:
    """Evaluate the checkpoint(s) that `cfg.checkpoint` points at; returns {checkpoint: {task: file}}."""
    settings: EvalSettings = build(cfg, "", _recursive_=False)
    probe: LinearProbeSettings = build(cfg.linear_probe, "linear_probe")
    knn: KnnSettings = build(cfg.knn, "knn")
    _check_tasks(cfg)
    if settings.retain_freed_memory:
        retain_freed_memory()
    checkpoints = find_checkpoints(Path(settings.checkpoint))
    if settings.output_dir and len(checkpoints) > 1:
        raise ConfigError(f"output_dir: {settings.checkpoint} holds {len(checkpoints)} runs; leave output_dir unset "
                          "so that each run gets its own eval/ folder")
    output_dir = Path(settings.output_dir) if settings.output_dir else None
    warned: set[str] = set()
    return {checkpoint: evaluate_checkpoint(cfg, settings, probe, knn, checkpoint, output_dir, warned)
            for checkpoint in checkpoints}
