"""Step time (and, on GPUs, step memory) of trainer.strategy=fsdp against ddp on the same ranks, alternating.

Each of `world` ranks holds two copies of the SLIP task on the same model: one wrapped by the engine's DDP strategy,
one sharded by its FSDP strategy (`slip.app.strategy`). Rounds alternate `--steps` timed training steps
(forward, backward, gradient reduction, AdamW) of each, after one untimed warm-up step of each, so both see the
same machine load; the ratio is FSDP / DDP of the median step times, and per round. `--device cuda` runs on
the GPUs (nccl, one per rank) and also records each strategy's peak memory above what was allocated before its
step (activations and gathered weights) and the bytes of its weights, gradients and AdamW state on each rank.

    python benchmarks/fsdp_step_time.py --model vit_s16 --world 2 --batch 4 --rounds 3 --steps 2 \
        --out benchmarks/results/fsdp_step_time
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slip.api import create_model  # noqa: E402
from slip.app.strategy import FSDPSettings, Replicated, Sharded  # noqa: E402
from slip.app.task import TrainTask  # noqa: E402
from slip.distributed import WorldInfo, convert_sync_batchnorm, make_gather  # noqa: E402
from slip.losses import SLIPLoss  # noqa: E402


def slip_task(model_name: str, world: WorldInfo) -> TrainTask:
    """The SLIP task on the registered model `model_name`, its SSL head's BatchNorm over the global batch."""
    torch.manual_seed(0)
    objective = SLIPLoss()
    model = create_model(model_name, inputs=objective.inputs)
    objective.bind(model.spec)
    objective.set_gather(make_gather(world))
    convert_sync_batchnorm(model.image_mlp)
    return TrainTask(model, objective)


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this rank holds of `tensor` (its local shard where sharded)."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return tensor.numel() * tensor.element_size()


def _held_bytes(task: TrainTask, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of weights, gradients and optimizer state (local shards where sharded)."""
    tensors = [*task.parameters(), *(p.grad for p in task.parameters() if p.grad is not None),
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    return sum(local_bytes(tensor) for tensor in tensors)


def _rank(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    world = WorldInfo(rank=rank, world_size=args.world, local_rank=rank)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    runs = {}
    base = slip_task(args.model, world).to(device)
    for name, strategy in (("ddp", Replicated(world, device)), ("fsdp", Sharded(world, device, FSDPSettings()))):
        task = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
        wrapped = strategy.wrap(task, optimizer, None)
        runs[name] = (task, wrapped, optimizer, strategy)
    size = base.model.spec.preprocess.image_size
    generator = torch.Generator().manual_seed(rank)
    batch = {key: torch.randn(args.batch, 3, size, size, generator=generator) for key in ("image", "aug1", "aug2")}
    batch["text"] = torch.randint(1, 1000, (args.batch, base.model.spec.text.context_length), generator=generator)
    batch = {key: value.to(device) for key, value in batch.items()}
    memory: dict[str, dict[str, int]] = {}

    def step(name: str) -> float:
        task, wrapped, optimizer, strategy = runs[name]
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = wrapped(batch)["loss"]
        loss.backward()
        strategy.finish_gradients(task, exact=False)
        optimizer.step()
        if cuda:
            memory[name] = {"step_peak_above_start": torch.cuda.max_memory_allocated() - before,
                            "weights_grads_optimizer": _held_bytes(task, optimizer)}
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - start

    times: dict[str, list[list[float]]] = {"ddp": [], "fsdp": []}
    for name in times:
        step(name)  # warm-up
    for _ in range(args.rounds):
        for name in times:
            times[name].append([step(name) for _ in range(args.steps)])
    if rank == 0:
        Path(args.out).with_suffix(".ranks.json").write_text(json.dumps({"times": times, "memory": memory}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="images per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each strategy per round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_step_time"))
    args = parser.parse_args()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank, args=(args, port), nprocs=args.world, start_method="spawn")
    scratch = args.out.with_suffix(".ranks.json")
    recorded = json.loads(scratch.read_text())
    times, memory = recorded["times"], recorded["memory"]
    scratch.unlink()
    medians = {name: statistics.median(t for round_ in rounds for t in round_) for name, rounds in times.items()}
    per_round = [statistics.median(f) / statistics.median(d) for d, f in zip(times["ddp"], times["fsdp"])]
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "machine": (torch.cuda.get_device_name(0) + ", nccl, bf16 autocast"
                                                    if args.device == "cuda" else
                                                    f"{platform.machine()}, {os.cpu_count()} CPUs, gloo, CPU, fp32")}
    result = {"meta": meta, "seconds_per_step": times, "median_seconds": medians, "rank0_memory_bytes": memory,
              "fsdp_over_ddp": medians["fsdp"] / medians["ddp"], "fsdp_over_ddp_per_round": per_round}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# FSDP against DDP step time on the same ranks ({args.device})", "",
             f"`{meta['command']}` ({meta['date']}, torch {meta['torch']}, {meta['machine']}): {args.model} SLIP, "
             f"{args.world} ranks x {args.batch} images, AdamW; {args.rounds} rounds of {args.steps} timed "
             "steps of each strategy, alternating.", "",
             "| strategy | median s/step | steps |", "|---|---:|---:|",
             *(f"| {name} | {medians[name]:.3f} | {', '.join(f'{t:.2f}' for r in times[name] for t in r)} |"
               for name in times), "",
             f"FSDP / DDP: {result['fsdp_over_ddp']:.3f} (per round: "
             f"{', '.join(f'{ratio:.3f}' for ratio in per_round)}).",
             *([""] + [f"Rank 0, {name}: step peak {m['step_peak_above_start'] / 2**30:.2f} GiB above the step's "
                       f"start; weights + gradients + AdamW {m['weights_grads_optimizer'] / 2**30:.2f} GiB"
                       for name, m in memory.items()] if memory else [])]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
