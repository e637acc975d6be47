"""Per-rank bytes of weights + gradients + AdamW state under trainer.strategy=fsdp, counted from the tensors.

For each model and world size, `world` gloo ranks on the CPU build the SLIP task (model, SLIP objective), shard it
with the engine's own strategy (`slip.app.strategy.Sharded`: a unit per transformer block, the task the root),
take one real forward, backward and AdamW step on two small images per rank (the towers take any multiple of the
patch size; the byte counts do not depend on the image size), and count what each rank holds: the local shards of
the weights, of their gradients after backward, and of AdamW's moments and step counters. Under DDP each rank
holds the whole of each (world 1's figures). The target is <= 1.1 x (full / world) + the part kept whole on every
rank (0-d parameters: logit scale; buffers are not counted).

    python benchmarks/fsdp_memory.py --models vit_b16 vit_l16 --worlds 1 2 4 --out benchmarks/results/fsdp_memory
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdp_step_time import local_bytes, slip_task  # noqa: E402  (beside this script)
from slip.app.strategy import FSDPSettings, Sharded  # noqa: E402
from slip.distributed import WorldInfo  # noqa: E402


def _rank(rank: int, world_size: int, model_name: str, port: int, out: str) -> None:
    torch.set_num_threads(1)
    world = WorldInfo(rank=rank, world_size=world_size, local_rank=rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    task = slip_task(model_name, world)
    model = task.model
    full = sum(parameter.numel() * parameter.element_size() for parameter in task.parameters())
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    strategy = Sharded(world, torch.device("cpu"), FSDPSettings())
    strategy.wrap(task, optimizer, None)
    whole = sum(local_bytes(p) for p in strategy.replicated)
    side = model.spec.vision.patch_size * 2
    generator = torch.Generator().manual_seed(rank)
    batch = {key: torch.randn(2, 3, side, side, generator=generator) for key in ("image", "aug1", "aug2")}
    batch["text"] = torch.randint(1, 1000, (2, model.spec.text.context_length), generator=generator)
    task(batch)["loss"].backward()
    strategy.finish_gradients(task, exact=False)
    weights = sum(local_bytes(p) for p in task.parameters())
    grads = sum(local_bytes(p.grad) for p in task.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(local_bytes(value) for per_param in optimizer.state.values() for value in per_param.values()
                if isinstance(value, torch.Tensor))
    result = {"rank": rank, "weights": weights, "grads": grads, "optimizer": state, "full_weights": full,
              "whole_on_every_rank": whole}
    Path(out, f"{model_name}-{world_size}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure(model_name: str, world_size: int, out: Path) -> dict:
    """The largest rank's figures for `model_name` on `world_size` ranks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank, args=(world_size, model_name, port, str(out)), nprocs=world_size, start_method="spawn")
    ranks = [json.loads((out / f"{model_name}-{world_size}-{rank}.json").read_text()) for rank in range(world_size)]
    for rank in range(world_size):
        (out / f"{model_name}-{world_size}-{rank}.json").unlink()
    worst = max(ranks, key=lambda r: r["weights"] + r["grads"] + r["optimizer"])
    total = worst["weights"] + worst["grads"] + worst["optimizer"]
    full_total = 4 * worst["full_weights"]  # weights, gradients, two AdamW moments (fp32); step counters aside
    whole = 4 * worst["whole_on_every_rank"]
    target = 1.1 * (full_total - whole) / world_size + whole
    return {"model": model_name, "world": world_size, **{k: worst[k] for k in ("weights", "grads", "optimizer")},
            "per_rank_total": total, "ddp_per_rank_total": full_total, "whole_on_every_rank": whole,
            "target": target, "meets_target": total <= target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_memory"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.out.parent / ".fsdp_memory_ranks"
    scratch.mkdir(exist_ok=True)
    rows = []
    for model_name in args.models:
        for world_size in args.worlds:
            rows.append(measure(model_name, world_size, scratch))
            print(json.dumps(rows[-1]), flush=True)
    scratch.rmdir()
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, gloo, CPU"}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    gib = 2**30
    lines = ["# Per-rank memory of weights + gradients + AdamW state under trainer.strategy=fsdp", "",
             f"`{meta['command']}` ({meta['date']}, torch {meta['torch']}, {meta['machine']}). Counted from the "
             "tensors each rank holds after one real SLIP step (fp32 weights, AdamW); activations and buffers are "
             "not counted. DDP holds the world-1 figure on every rank. Target: <= 1.1 x (full / world) + the part "
             "kept whole on every rank.", "",
             "| model | world | weights GiB | grads GiB | AdamW GiB | per rank GiB | DDP per rank GiB | target GiB | "
             "meets |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['model']} SLIP | {row['world']} | {row['weights'] / gib:.3f} | {row['grads'] / gib:.3f} "
                     f"| {row['optimizer'] / gib:.3f} | {row['per_rank_total'] / gib:.3f} | "
                     f"{row['ddp_per_rank_total'] / gib:.3f} | {row['target'] / gib:.3f} | "
                     f"{'yes' if row['meets_target'] else 'NO'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
