"""Sharded checkpoints: a directory that torch.distributed.checkpoint (DCP) writes, every rank its own shards.

The directory holds DCP's files for the entries that hold sharded tensors (DTensors: the weights and optimizer
state of a `trainer.strategy=fsdp` run) and `meta.pt`, a plain `torch.save` of every other entry (config, step,
RNG states), written by rank 0. Read whole (`read_sharded`), it is the same dict as a `.pt` checkpoint of the same
run, with full tensors, so every reader of our checkpoints reads both. Read into sharded tensors
(`load_sharded_into`), DCP re-slices it for any number of processes.

A save goes to a staging directory beside the destination and is moved into place only when every rank has
written; a crash or a full disk during a save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
# What torch's own dcp_to_torch_save reads with: the whole checkpoint, its structure from the metadata.
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor

from slip.checkpoint import atomic_save, read_safely
from slip.distributed import WorldInfo, any_rank, whole_tensor

__all__ = ["META_FILE", "holds_dtensors", "is_sharded_checkpoint", "load_sharded_into", "read_sharded",
           "read_sharded_meta", "remove_path", "replace_path", "as_full_tensor", "existing_checkpoint", "save_sharded", "sharded_entries", "staging_path"]

META_FILE = "meta.pt"  # the entries without sharded tensors, and the names of those with
_DCP_METADATA = ".metadata"  # written by DCP's coordinator once every rank's shards are on disk
SHARDED_KEYS = "sharded_entries"  # in meta.pt: which entries DCP holds


def holds_dtensors(value: Any) -> bool:
    """Whether `value` (a tensor, or nested dicts / lists of them) holds a DTensor."""
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(holds_dtensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_dtensors(item) for item in value)
    return False


def sharded_entries(checkpoint: Mapping[str, Any]) -> list[str]:
    """The top-level entries of `checkpoint` that hold DTensors (what DCP writes shard by shard)."""
    return [key for key, value in checkpoint.items() if holds_dtensors(value)]


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `save_sharded`."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / _DCP_METADATA).is_file()


def staging_path(path: Path) -> Path:
    """The hidden directory beside `path` that a save of `path` writes before it is moved into place."""
    return path.with_name(f".{path.name}.staging")


def _retired_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def replace_path(staged: Path, path: Path) -> None:
    """Move `staged` (a file or directory) to `path`, replacing what is there (a file or directory).

    The old one is first moved aside to a hidden name and deleted after; a crash between the two renames leaves
    it there, where `existing_checkpoint` finds it.
    """
    retired = _retired_path(path)
    if retired.exists():
        remove_path(retired)
    if path.exists():
        os.replace(path, retired)
    os.replace(staged, path)
    _fsync_directory(path.parent)
    if retired.exists():
        remove_path(retired)


def existing_checkpoint(path: Path) -> Path | None:
    """`path` if it exists, else the previous checkpoint a crash in `replace_path` left moved aside, else None."""
    if path.exists():
        return path
    retired = _retired_path(path)
    return retired if retired.exists() else None


def remove_path(path: Path) -> None:
    """Delete `path` (a file or a directory), if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(checkpoint: Mapping[str, Any], path: str | os.PathLike, world: WorldInfo,
                 device: torch.device) -> None:
    """Write `checkpoint` to the directory `path`; a collective call of every rank of `world` (rank 0 writes the
    plain entries; `device`: where the ranks' collectives run).

    Entries holding DTensors go through DCP, each rank writing its shards; rank 0 writes the rest to `meta.pt`
    and, once every rank's shards are written, moves the staging directory into place. An OSError (e.g. a full
    disk) on any rank is raised on every rank, and leaves `path` as it was.
    """
    path = Path(path)
    staging = staging_path(path)
    if world.is_main:
        if staging.exists():  # what a save cut short by kill -9 left
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    if world.is_distributed:
        dist.barrier()
    sharded = sharded_entries(checkpoint)
    try:
        dcp.save({key: checkpoint[key] for key in sharded}, checkpoint_id=staging)
    except (Exception, CheckpointException) as error:  # on every rank when any rank's write failed
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise _os_error(error, staging) from error
    failure: OSError | None = None
    if world.is_main:
        meta = {key: value for key, value in checkpoint.items() if key not in sharded}
        try:
            atomic_save({**meta, SHARDED_KEYS: sharded}, staging / META_FILE)
            replace_path(staging, path)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            failure = error
    if any_rank(failure is not None, world, device):
        raise failure if failure is not None else OSError(f"rank 0 could not finish the save to {path}")


def _os_error(error: Exception, where: Path) -> OSError:
    """The OSError inside a DCP failure (a full disk keeps its errno), else one naming the directory."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)  # CheckpointException: {rank: exception}
        if isinstance(failures, Mapping):  # CheckpointException: {rank: (exception, its traceback)}
            found = [failure[0] if isinstance(failure, tuple) and failure else failure for failure in failures.values()]
            pending.extend(failure for failure in found if isinstance(failure, BaseException))
        pending.extend(part for part in (current.__cause__, current.__context__) if part is not None)
    return OSError(f"writing the shards to {where} failed: {str(error).splitlines()[0] if str(error) else error!r}")


def read_sharded_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The plain entries of a sharded checkpoint (no tensor shards read), and under `sharded_entries` the names of
    the others."""
    path = Path(path)
    content = read_safely(path / META_FILE)
    if not isinstance(content, Mapping):
        raise ValueError(f"{path / META_FILE}: not a sharded checkpoint's metadata")
    return dict(content)


def read_sharded(path: str | os.PathLike) -> dict[str, Any]:
    """A whole sharded checkpoint in this process, with full tensors: the dict a `.pt` checkpoint holds."""
    path = Path(path)
    meta = read_sharded_meta(path)
    tensors: dict[str, Any] = {}
    _load_state_dict(tensors, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    missing = [key for key in meta.get(SHARDED_KEYS, []) if key not in tensors]
    if missing:
        raise ValueError(f"{path}: its shards hold no {', '.join(missing)}")
    meta.pop(SHARDED_KEYS, None)
    return {**meta, **tensors}


def load_sharded_into(template: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Fill `template`'s DTensor entries (this rank's shards, any number of ranks) from the sharded checkpoint at
    `path`, in place, and return the checkpoint: those entries plus the plain ones from `meta.pt`. Collective."""
    path = Path(path)
    meta = read_sharded_meta(path)
    saved = meta.pop(SHARDED_KEYS, [])
    wanted = {key: template[key] for key in sharded_entries(template)}
    if set(wanted) - set(saved):
        raise ValueError(f"{path}: holds no shards of {', '.join(sorted(set(wanted) - set(saved)))}")
    dcp.load(wanted, checkpoint_id=path)
    return {**meta, **wanted}


def as_full_tensor(value: Any) -> Any:
    """`value` with every DTensor gathered to a full tensor (collective where it holds any)."""
    if isinstance(value, torch.Tensor):
        return whole_tensor(value)
    if isinstance(value, Mapping):
        return {key: as_full_tensor(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_full_tensor(item) for item in value]
    return value

