"""Process-group bookkeeping and a differentiable all-gather for contrastive losses."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Gather = Callable[[Tensor], tuple[Tensor, int]]
"""Maps a local batch to (global batch, row offset of the local rows inside it)."""

# (rank, world size, local rank) variable names, in order of precedence.
_LAUNCHER_VARS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun / torch.distributed.launch
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
)


def _read_int(env: Mapping[str, str], name: str) -> int:
    """Parse env[name] as an integer, raising a ValueError that names the variable."""
    if name not in env:
        raise ValueError(f"environment variable {name} is missing but its launcher's other variables are set")
    try:
        return int(env[name].strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not 0 <= self.local_rank < self.world_size:
            raise ValueError(f"local_rank must be in [0, {self.world_size}), got {self.local_rank}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorldInfo":
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's variables, else a single process."""
        env = os.environ if env is None else env
        for rank_var, size_var, local_var in _LAUNCHER_VARS:
            if not any(name in env for name in (rank_var, size_var, local_var)):
                continue
            rank, size, local = (_read_int(env, name) for name in (rank_var, size_var, local_var))
            if size < 1:
                raise ValueError(f"environment variable {size_var}={size} must be >= 1")
            if not 0 <= rank < size:
                raise ValueError(f"environment variable {rank_var}={rank} must be in [0, {size_var}={size})")
            if not 0 <= local < size:
                raise ValueError(f"environment variable {local_var}={local} must be in [0, {size_var}={size})")
            return cls(rank=rank, world_size=size, local_rank=local)
        return cls()

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[003-005,010],cpu01' (-> 'gpu003')."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ValueError(f"cannot read a host name from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for env:// init: as given (torchrun), else derived from SLURM's job variables."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return {"MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env["MASTER_PORT"]}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("distributed run without MASTER_ADDR/MASTER_PORT or SLURM_JOB_NODELIST: "
                         "launch with torchrun or srun")
    # Every task of a job computes the same port, and concurrent jobs on one node get different ones.
    port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist), "MASTER_PORT": port}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU (cuda:`local_rank`) when CUDA is available, else the CPU; other names as torch
    reads them ("cpu", "cuda", "cuda:1"); ValueError naming the value when torch cannot read it."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def init_process_group(world: WorldInfo, backend: str | None = None, init_method: str = "env://") -> None:
    """Join the default process group (nccl when CUDA is available, else gloo); no-op for one process."""
    if not world.is_distributed:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if init_method == "env://":
        os.environ.update(rendezvous_env(os.environ))
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=world.rank, world_size=world.world_size)


def leave_process_group(world: WorldInfo) -> None:
    """Wait for every rank, then leave the default process group; no-op for one process or when never joined.

    A process that exits with the group still up, or that tears it down while a peer is still talking, can
    abort in gloo's teardown ("terminate called without an active exception", SIGABRT) after its work is done.
    """
    if world.is_distributed and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks(value: Any, world: WorldInfo) -> list[Any]:
    """`value` of every rank, in rank order (a picklable object; one process: just its own)."""
    if not world.is_distributed:
        return [value]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, world: WorldInfo, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (every rank gets the same answer)."""
    if not world.is_distributed:
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def whole_tensor(tensor: Tensor) -> Tensor:
    """`tensor` in full: a sharded DTensor (FSDP2's parameters) gathered from every rank; any other as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _check_same_shape(tensor: Tensor) -> None:
    """Raise on every rank if the ranks' tensors differ in shape (all_gather needs equal shapes)."""
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        found = [tuple(s.tolist()) for s in shapes]
        raise ValueError(f"all_gather_with_grad needs the same shape on every rank, got per-rank shapes {found}")


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor over ranks; the backward sums gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss may depend on our rows, so their gradient is the sum over ranks.
        # Clone because autograd does not allow modifying the incoming gradient in place.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` over all ranks along dim 0, differentiably (equal shapes on all ranks required)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_gather_with_grad needs an initialised torch.distributed process group")
    _check_same_shape(tensor)
    return _AllGatherWithGrad.apply(tensor)


def local_gather(tensor: Tensor) -> tuple[Tensor, int]:
    """The single-process Gather: the local batch is the global batch, at offset 0."""
    return tensor, 0


def make_gather(world: WorldInfo) -> Gather:
    """The Gather for `world`: `local_gather` for one process, else a differentiable all-gather."""
    if not world.is_distributed:
        return local_gather

    def gather(tensor: Tensor) -> tuple[Tensor, int]:
        # A wrong offset would silently pair rows with the wrong labels, so check the group agrees.
        if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (world.rank, world.world_size):
            raise RuntimeError(
                f"WorldInfo(rank={world.rank}, world_size={world.world_size}) does not match the process group "
                f"(rank={dist.get_rank()}, world_size={dist.get_world_size()})"
            )
        return all_gather_with_grad(tensor), world.rank * tensor.shape[0]

    return gather


def _buckets(tensors: Sequence[Tensor], limit_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive groups of `tensors` of at most `limit_bytes` each (a larger tensor forms a group alone)."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def average_gradients(parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = 25 * 2**20) -> None:
    """Replace every `.grad` by its mean over the ranks (what DDP's reducer does), in flat buckets per dtype.

    For backward passes that do not run through DDP's forward (exact accumulation); every rank must hold
    gradients for the same parameters, in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            by_kind.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter.grad)
    for grads in by_kind.values():
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for grad, averaged in zip(bucket, flat.split([grad.numel() for grad in bucket])):
                grad.copy_(averaged.view_as(grad))


class SyncBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks, on any backend (gloo too).

    torch.nn.SyncBatchNorm only runs on GPUs; this one uses autograd-aware all-reduces, so CPU runs under
    torchrun give the same result as one process on the global batch. Its state dict keys are BatchNorm1d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the statistics of the global batch while training with several ranks."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = x.shape[0] * dist.get_world_size()  # all ranks hold equal batches (all_gather_with_grad needs it)
        mean = all_reduce(x.sum(dim=0)) / count
        centred = x - mean
        var = all_reduce((centred * centred).sum(dim=0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1 / (int(self.num_batches_tracked) + 1)
                # float32 statistics of bf16 activations (FSDP's mixed precision computes in bf16)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * count / max(count - 1, 1)).to(self.running_var.dtype), momentum)
                self.num_batches_tracked.add_(1)
        out = centred * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm1d in `module` by a SyncBatchNorm1d holding the very same parameter and buffer
    tensors, so that an optimizer built before the conversion still trains them."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm1d:
            synced = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device="meta")
            for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(synced, key, tensor)
            setattr(module, name, synced.train(child.training))
        else:
            convert_sync_batchnorm(child)
    return module
