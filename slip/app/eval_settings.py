"""The evaluation settings as checked config nodes: conf/eval.yaml (`EvalSettings` and its `linear_probe` and
`knn` sections) and the training run's `val` group (`ValSettings`). Each node is checked against these signatures
before any work, as the training nodes are, and the YAML holds every default: no field here has one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slip.data.labelled import parse_group_key
from slip.distributed import resolve_device
from slip.eval.knn import KnnVote
from slip.eval.l2_sweep import L2Sweep
from slip.pretrained import WEIGHTS

__all__ = ["EvalSettings", "KnnSettings", "LinearProbeSettings", "PROBE_METHODS", "ValSettings"]

# lbfgs: CLIP's protocol (regularisation swept on a split of train); sgd: SLIP's.
PROBE_METHODS = ("lbfgs", "sgd")


@dataclass(frozen=True)
class LinearProbeSettings:
    """conf/eval.yaml's `linear_probe` section: the method, and the L-BFGS probe's sweep (`sweep`, checked here).

    `val_groups` (None: a stratified split) names what keeps groups of training images on one side of the sweep's
    validation split: a column of a CSV list, or ``path:N``, the N-th component of each listed image path."""

    method: str
    val_fraction: float
    refinements: int
    max_iter: int
    seed: int
    val_groups: str | None

    def __post_init__(self) -> None:
        if self.method not in PROBE_METHODS:
            raise ValueError(f"method must be one of {list(PROBE_METHODS)}, got {self.method!r}")
        self.sweep  # built here so that a bad number fails as this node is built
        if self.val_groups is not None:
            parse_group_key(self.val_groups)
            if self.method != "lbfgs":
                raise ValueError(f"val_groups splits the lbfgs probe's validation set; {self.method} holds none out")

    @property
    def sweep(self) -> L2Sweep:
        """The L-BFGS probe's l2 sweep on the default grid."""
        return L2Sweep(val_fraction=self.val_fraction, refinements=self.refinements, max_iter=self.max_iter,
                       seed=self.seed)


@dataclass(frozen=True)
class KnnSettings:
    """conf/eval.yaml's `knn` section; checked where the node is built."""

    k: int
    temperature: float

    def __post_init__(self) -> None:
        self.vote  # built here so that a bad number fails as this node is built

    @property
    def vote(self) -> KnnVote:
        """The kNN vote with these settings."""
        return KnnVote(k=self.k, temperature=self.temperature)


@dataclass(frozen=True)
class EvalSettings:
    """conf/eval.yaml's top level. `tasks`, `datasets` and `catalog` stay config nodes (the tasks check them);
    `linear_probe` and `knn` are checked nodes of their own."""

    checkpoint: str
    weights: str
    output_dir: str | None
    feature_cache: str | None
    data_root: str
    device: str
    batch_size: int
    num_workers: int
    overwrite: bool
    retain_freed_memory: bool
    tasks: Any
    datasets: Any
    catalog: Any
    linear_probe: Any
    knn: Any

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a one-line ValueError naming a value torch cannot read
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {self.weights!r}")


@dataclass(frozen=True)
class ValSettings:
    """A training run's `val` node (conf/val/*.yaml): zero-shot classification during and after training.

    `max_images`: "auto" (at most the images the run trains on, at least 96, evenly spaced), "all", or a number;
    `prompts`: a built-in prompt set or a JSON file, or null for the dataset's own class names.
    """

    dataset: Any
    prompts: str | None
    batch_size: int
    max_images: int | str
