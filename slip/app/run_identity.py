"""Run identity: the settings that define what a run trains, and the check that a resume keeps them.

A run directory holds one run. Every setting that changes the trained weights or the order of the data belongs to
its identity; resuming with another value stops before any work, naming the key. The settings that may change on
resume are listed here too, and a test keeps the two lists complete (every trainer field and every top-level
config key is in exactly one of them).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from slip.app.config import ConfigError, first_difference
from slip.app.run_layout import latest_checkpoint
from slip.checkpoint import CheckpointError, read_checkpoint
from slip.sharded_checkpoint import is_sharded_checkpoint, read_sharded_meta

__all__ = ["BatchLayout", "FREE_SECTIONS", "checkpoint_to_resume", "IDENTITY_SECTIONS", "TRAINER_FREE_KEYS", "TRAINER_IDENTITY_KEYS",
           "check_resume", "saved_processes"]

# Config sections compared whole on resume (their batch-layout keys apart, see BatchLayout).
IDENTITY_SECTIONS = ("model", "loss", "teacher", "data", "augment", "optim", "schedule")
# Top-level keys that may change: validation (it reads the weights, it does not change them) and naming.
FREE_SECTIONS = ("val", "output_root", "run_name")

# trainer.* keys that change the trained weights (or which steps are taken).
TRAINER_IDENTITY_KEYS = frozenset({
    "update_freq",      # the global batch, and with accumulation=independent the objective
    "accumulation",     # exact (one big-batch step) or independent (a sum of small-batch objectives)
    "precision",        # the arithmetic of every step
    "grad_clip",
    "seed",             # initial weights, data order, augmentations
    "init_grad_scale",  # fp16: which early steps overflow and are skipped
})
# trainer.* keys that may change on resume: how long, how often to log, save and validate, and where it runs.
TRAINER_FREE_KEYS = frozenset({
    "epochs", "max_steps",  # extending a run (the schedule then spans the new length)
    "stop_after", "resume",
    "log_every", "log_images", "save_every", "eval_every",
    "device", "compile", "retain_freed_memory",
    "strategy", "fsdp",     # how processes hold the weights: the same steps (fp64-tested; bf16 rounds differently)
    "grad_checkpointing",   # recomputes the same activations (BatchNorm statistics included)
    "max_bad_fraction", "max_bad_in_a_row", "max_nonfinite_steps",  # when to give up, not what a step computes
})


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is made: per-process micro-batches, processes, micro-batches per optimizer step."""

    batch_size: int
    processes: int
    update_freq: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.batch_size * self.processes * self.update_freq

    def describe(self) -> str:
        """E.g. '8 x 2 processes x update_freq 2 = 32'."""
        return (f"{self.batch_size} x {self.processes} process{'es' if self.processes != 1 else ''} x update_freq "
                f"{self.update_freq} = {self.global_batch}")

    @classmethod
    def of(cls, cfg: DictConfig, processes: int) -> "BatchLayout":
        """The layout a training config asks for on `processes` processes."""
        return cls(int(cfg.data.batch_size), processes, int(cfg.trainer.update_freq))


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _without(cfg: DictConfig, keys: tuple[str, ...]) -> DictConfig:
    """A copy of `cfg` without the dotted `keys`."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(copy, parent) if parent else copy
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    return copy


def check_resume(saved: DictConfig, current: DictConfig, saved_processes: int, processes: int,
                 relayout_reason: str | None, path: Path, sections: tuple[str, ...] = IDENTITY_SECTIONS) -> None:
    """Raise a one-line ConfigError naming the first setting in which `current` would not continue the run that
    `saved` (a checkpoint's config, in today's layout) trained on `saved_processes` processes. `sections` are the
    top-level keys compared whole (a fine-tuning run has its own).

    The batch layout (data.batch_size, processes, trainer.update_freq) may change at the same global batch
    when that trains the same thing: `relayout_reason` is None then, else why it would not (e.g. a tower with
    batch statistics); map-style data may also change data.num_workers, which decides nothing about the samples.
    """
    stream = _value(current, "data.stream") is not None
    layout_keys = ("data.batch_size", "trainer.update_freq") + (() if stream else ("data.num_workers",))
    old, new = _without(saved, layout_keys), _without(current, layout_keys)
    where = f"differs from the checkpoint {path}"
    for section in sections:
        difference = first_difference(old.get(section), new.get(section), section)
        if difference is not None:
            raise ConfigError(f"{difference}: {where} ({_shown(saved, difference)} there, "
                              f"{_shown(current, difference)} here); resume with the same config or use another "
                              "run_name")
    trainer_old = {key: _value(old, f"trainer.{key}") for key in TRAINER_IDENTITY_KEYS}
    trainer_new = {key: _value(new, f"trainer.{key}") for key in TRAINER_IDENTITY_KEYS}
    difference = first_difference(trainer_old, trainer_new, "trainer")
    if difference is not None:
        raise ConfigError(f"{difference}: {where} ({_shown(saved, difference)} there, {_shown(current, difference)} "
                          "here); resume with the same value or use another run_name")
    _check_layout(BatchLayout.of(saved, saved_processes), BatchLayout.of(current, processes),
                  _relayout_blocker(saved, current, relayout_reason), where)


def _relayout_blocker(saved: DictConfig, current: DictConfig, relayout_reason: str | None) -> str | None:
    """Why the batch layout must stay as it was, or None when any layout of the same global batch trains the same."""
    if _value(current, "data.stream") is not None:
        return "a stream's readers split it by processes and workers"
    uses_independent = any(_value(cfg, "trainer.accumulation") == "independent" and
                           int(_value(cfg, "trainer.update_freq")) > 1 for cfg in (saved, current))
    if uses_independent:
        return "trainer.accumulation=independent sums per-micro-batch objectives"
    return relayout_reason


def _check_layout(old: BatchLayout, new: BatchLayout, blocker: str | None, where: str) -> None:
    if old == new:
        return
    key = ("data.batch_size" if old.batch_size != new.batch_size else
           "trainer.update_freq" if old.update_freq != new.update_freq else "processes")
    if old.global_batch != new.global_batch:
        raise ConfigError(f"{key}: the global batch {new.describe()} {where} ({old.describe()}); keep the global "
                          "batch or use another run_name")
    if blocker is not None:
        raise ConfigError(f"{key}: the batch layout {new.describe()} {where} ({old.describe()}), and with "
                          f"{blocker} only the same layout continues the run exactly; use another run_name")


def _shown(cfg: DictConfig, dotted: str) -> str:
    value = _value(cfg, dotted.replace("[", ".").replace("]", ""))
    return repr(OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value)


def saved_processes(checkpoint: Mapping[str, Any]) -> int:
    """The number of processes that trained a checkpoint (recorded; older checkpoints: one RNG state per rank)."""
    return int(checkpoint.get("processes", len(checkpoint.get("rng", [None]))))


def checkpoint_to_resume(setting: str, run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint `trainer.resume` names, read, and its path: with "auto" the run dir's latest (None when it
    has none), with "never" none (a one-line ConfigError where one exists, which it would overwrite), else the
    path given. Of a sharded checkpoint only the plain entries are read (`Trainer.resume` reads the shards)."""
    latest = latest_checkpoint(run_dir)
    if setting == "never":
        if latest is not None:
            raise ConfigError(f"trainer.resume: {latest} exists and resume=never would overwrite it; "
                              "use trainer.resume=auto or another run_name")
        return None
    path = latest if setting == "auto" else Path(setting)
    if path is None:
        return None
    if is_sharded_checkpoint(path):
        meta = read_sharded_meta(path)
        if meta.get("format") != "slip":
            raise CheckpointError(f"{path}: not a slip checkpoint")
        return meta, path
    return read_checkpoint(path), path
