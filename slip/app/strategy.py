"""trainer.strategy: how the processes hold the task: whole replicas (DDP), or shards (FSDP2's `fully_shard`).

The engine asks its strategy to wrap the task, to sync or hold back gradients per backward pass, to reduce what
backward did not, to clip, to gather the weights for evaluation, and to write and read checkpoints. `ddp` keeps
today's one-file checkpoint (`checkpoints/last.pt`, rank 0 writes it); `fsdp` writes a sharded DCP directory
(`checkpoints/last.dcp`, every rank its shards). Either reads the other's, at any number of processes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from slip.checkpoint import atomic_save
from slip.distributed import WorldInfo, average_gradients
from slip.app.run_layout import CHECKPOINT_IN_RUN, SHARDED_CHECKPOINT_IN_RUN
from slip.sharded_checkpoint import load_sharded_into, read_sharded, save_sharded

__all__ = ["FSDPSettings", "STRATEGIES", "Replicated", "Sharded", "ShardedScaler", "make_strategy", "optimizer_state_by_index",
           "optimizer_state_by_name"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class FSDPSettings:
    """The `trainer.fsdp` node: how `trainer.strategy=fsdp` shards (its mixed precision is `trainer.precision`)."""

    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (regather in backward)
    cpu_offload: bool = False  # keep the shards, their gradients and the optimizer state in host memory


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names in `module` of `optimizer`'s parameters, in the order of its param groups (its state's indices)."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def optimizer_state_by_name(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """`torch.optim.Optimizer.state_dict()` (parameters by index) keyed by parameter name instead, as
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` keys it; a dict keyed by name as it is."""
    if all(isinstance(key, str) for key in state["state"]):
        return dict(state)
    return {"state": {names[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_index(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `optimizer_state_by_name`: what `torch.optim.Optimizer.load_state_dict` takes."""
    if all(isinstance(key, int) for key in state["state"]):
        return dict(state)
    index = {name: position for position, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


class Replicated:
    """`ddp`: every process holds the whole task; DDP averages gradients (or `finish_gradients`, after exact
    accumulation's own backward passes); rank 0 writes `checkpoints/last.pt`."""

    checkpoint_in_run = CHECKPOINT_IN_RUN

    def __init__(self, world: WorldInfo, device: torch.device) -> None:
        self.world, self.device = world, device

    def wrap(self, task: nn.Module, optimizer: torch.optim.Optimizer, precision: torch.dtype | None) -> nn.Module:
        """The module that runs a training forward: DDP over `task` with several processes, else `task`."""
        if not self.world.is_distributed:
            return task
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(task, device_ids=ids)

    def grad_scaler(self, enabled: bool, init_scale: float) -> torch.amp.GradScaler:
        """The fp16 loss scaler (disabled for other precisions)."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=enabled)

    def micro_step_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP's `no_sync` unless `sync` (the window's last)."""
        no_sync = getattr(wrapped, "no_sync", None)
        return no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()

    def exact_sync(self, task: nn.Module) -> Callable[[bool], None] | None:
        """exact_backward's per-pass switch of gradient reduction: none, its passes reduce nothing themselves."""
        return None

    def finish_gradients(self, task: nn.Module, exact: bool) -> None:
        """Average over the ranks the gradients that backward left local (exact accumulation's)."""
        if exact and self.world.is_distributed:
            average_gradients(task.parameters())

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> None:
        """Scale the gradients down to a total norm of at most `max_norm`."""
        nn.utils.clip_grad_norm_(list(parameters), max_norm)

    @contextlib.contextmanager
    def gathered(self, task: nn.Module) -> Iterator[None]:
        """Inside the block, every weight of `task` is whole on this process (evaluation)."""
        yield

    def optimizer_state(self, task: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict as this strategy's checkpoint keeps it (by index)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, task: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Restore an optimizer state saved by either strategy (by index or by name, whole tensors)."""
        optimizer.load_state_dict(optimizer_state_by_index(state, parameter_names(task, optimizer)))

    def place(self, checkpoint: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
        """A read checkpoint made fit to load here (`template`: the task's `checkpoint_state`): whole tensors load
        as they are."""
        return checkpoint

    def read_sharded(self, path: Path, template: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A sharded checkpoint read whole on this process (`template`, the trainer's `state_dict`, is not needed)."""
        return read_sharded(path)

    def write(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Save `checkpoint` to `path` (rank 0 writes; an OSError leaves any previous file as it was)."""
        if self.world.is_main:
            atomic_save(checkpoint, path, remove_stale=True)  # one writer per run dir


def _scalars(module: nn.Module) -> set[nn.Parameter]:
    """The 0-d parameters of `module` (logit scales and biases): fully_shard shards dim 0 only, so they stay
    whole on every process and their gradients are averaged by `Sharded.finish_gradients`."""
    return {parameter for parameter in module.parameters() if parameter.ndim == 0}


class Sharded(Replicated):
    """`fsdp`: FSDP2. Each block the task names (`task.shard_units()`: transformer blocks, ResNet stages, the
    teacher) is a `fully_shard` unit and the task wraps the rest; every process holds 1/world of each weight, its
    gradient and its optimizer state, and gathers a unit's weights only while that unit runs."""

    checkpoint_in_run = SHARDED_CHECKPOINT_IN_RUN

    def __init__(self, world: WorldInfo, device: torch.device, settings: FSDPSettings) -> None:
        super().__init__(world, device)
        self.settings = settings
        self.replicated: list[nn.Parameter] = []

    def wrap(self, task: nn.Module, optimizer: torch.optim.Optimizer, precision: torch.dtype | None) -> nn.Module:
        """Shard `task` in place and point `optimizer` (built, with no state yet) at the shards."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)

        if optimizer.state:
            raise ValueError("shard the task before its optimizer takes a step")
        if not dist.is_initialized():  # one process: a group of one, so that the same code and checkpoints serve
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        names = {id(parameter): name for name, parameter in task.named_parameters()}
        with torch.no_grad():
            for parameter in task.parameters():  # fully_shard takes contiguous weights only (a channels-last
                if not parameter.is_contiguous():  # ResNet's are not)
                    parameter.data = parameter.data.contiguous()
            for tensor in [*task.parameters(), *task.buffers()]:  # rank 0's initial weights, as DDP starts from:
                dist.broadcast(tensor.data, src=0)  # ranks draw their own (seeded per rank for augmentations)
        mesh = init_device_mesh(self.device.type, (self.world.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32) if precision is not None
                  else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.settings.cpu_offload else OffloadPolicy()
        options = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
        for unit in task.shard_units():
            fully_shard(unit, reshard_after_forward=self.settings.reshard_after_forward,
                        ignored_params=_scalars(unit), **options)
        self.replicated = sorted(_scalars(task), key=lambda parameter: names[id(parameter)])
        fully_shard(task, ignored_params=set(self.replicated), **options)
        for method in task.sharded_methods:  # called by the engine besides forward (exact accumulation)
            register_fsdp_forward_method(task, method)
        by_name = dict(task.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [by_name[names[id(parameter)]] for parameter in group["params"]]
        return task

    def grad_scaler(self, enabled: bool, init_scale: float) -> torch.amp.GradScaler:
        """fp16's loss scaler, deciding overflow over every rank's shards."""
        return ShardedScaler(self.device.type, init_scale=init_scale, enabled=enabled)

    def micro_step_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter the gradients only in the window's last backward."""
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def exact_sync(self, task: nn.Module) -> Callable[[bool], None] | None:
        """exact_backward's per-pass switch: reduce-scatter in the objective's pass and the last replay only."""
        return task.set_requires_gradient_sync

    def finish_gradients(self, task: nn.Module, exact: bool) -> None:
        """Average the gradients of the parameters kept whole (FSDP reduced the shards' in backward)."""
        if self.world.is_distributed:
            average_gradients(self.replicated)

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> None:
        """Clip by the norm over every rank's shards and the whole parameters (counted once)."""
        from torch.distributed.tensor import DTensor

        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        sharded = [grad for grad in grads if isinstance(grad, DTensor)]
        whole = [grad for grad in grads if not isinstance(grad, DTensor)]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        if sharded:
            squares += nn.utils.get_total_norm(sharded).full_tensor().double() ** 2
        if whole:
            squares += nn.utils.get_total_norm(whole).double() ** 2
        coefficient = min(1.0, max_norm / (float(squares.sqrt()) + 1e-6))
        if coefficient < 1.0:
            for grad in grads:
                grad.mul_(coefficient)

    @contextlib.contextmanager
    def gathered(self, task: nn.Module) -> Iterator[None]:
        """The task's own (root) weights gathered; each block gathers its own as it runs."""
        task.unshard()
        try:
            yield
        finally:
            task.reshard()

    def optimizer_state(self, task: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state by parameter name, each tensor this rank's shard."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(task, optimizer)

    def load_optimizer_state(self, task: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Restore an optimizer state saved by either strategy, each whole tensor cut to this rank's shard."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        by_name = optimizer_state_by_name(state, parameter_names(task, optimizer))
        template = get_optimizer_state_dict(task, optimizer)
        set_optimizer_state_dict(task, optimizer, _distributed_like(by_name, template))

    def place(self, checkpoint: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
        """A read checkpoint with each whole tensor cut to this rank's shard where `template` (the task's own
        `checkpoint_state`) holds a sharded one."""
        return _distributed_like(checkpoint, template)

    def read_sharded(self, path: Path, template: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """This rank's shards of a sharded checkpoint written by any number of ranks, into `template()`'s tensors
        (collective)."""
        return load_sharded_into(template(), path)

    def write(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Every rank writes its shards to the directory `path` (collective; `save_sharded`)."""
        save_sharded(checkpoint, path, self.world, self.device)


class ShardedScaler(ShardedGradScaler):
    """FSDP's fp16 loss scaler (its `unscale_` takes the overflow flag's maximum over the ranks), stepping every
    optimizer as torch steps an unfused one: unscale, then step only without overflow. A fused AdamW's own overflow
    handling would see this rank's shards only, and fails on FSDP's flag."""

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (once) and take the optimizer's step unless any rank's gradients overflowed."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        overflowed = any(float(flag) for flag in state["found_inf_per_device"].values())
        result = None if overflowed else optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        return result


def _distributed_like(value: Any, template: Any) -> Any:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(template, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(template.device), template.device_mesh, template.placements,
                                 src_data_rank=None)
    if isinstance(value, Mapping) and isinstance(template, Mapping):
        return {key: _distributed_like(item, template.get(key)) for key, item in value.items()}
    return value


def make_strategy(name: str, fsdp: FSDPSettings, world: WorldInfo, device: torch.device) -> Replicated:
    """The strategy `trainer.strategy` names."""
    return Sharded(world, device, fsdp) if name == "fsdp" else Replicated(world, device)

