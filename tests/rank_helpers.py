"""Run a test's worker function in several spawned processes (gloo ranks) and collect what each returns."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed

from slip.distributed import WorldInfo, init_process_group, leave_process_group

Worker = Callable[[int, int], dict]
"""(rank, rendezvous port) -> the rank's results; a module-level function, so that spawned processes find it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(worker: Worker, rank: int, port: int, out_dir: str) -> None:
    try:
        torch.save(worker(rank, port), Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # The rank's work is done and saved. Leave without the interpreter's teardown: gloo's background threads
    # sometimes abort the process there (SIGABRT after a finished run: 2 of 8 runs of the rank tests here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# What every rank imports, imported once per test session by multiprocessing's fork server: each rank is still a new
# process of its own, forked from that server (which has run nothing) instead of started as a fresh interpreter that
# imports torch, timm and the app again (seconds per rank on 2 cores, for each of the suite's rank tests).
PRELOAD = ["torch", "torch.distributed", "numpy", "pytest", "timm", "slip", "slip.models", "slip.app.train"]


def _rank_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts: on the first call
    return context


def start_ranks(worker: Worker, world_size: int, out_dir: Path, timeout: float = 120) -> list[int]:
    """`worker(rank, port)` in `world_size` new processes, each killed after `timeout` s; their exit codes
    (negative: killed by that signal). Results and tracebacks are in `out_dir` (rank<N>.pt, rank<N>.err)."""
    context = _rank_context()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(worker, rank, port, str(out_dir))) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def run_ranks(worker: Worker, world_size: int, out_dir: Path, timeout: float = 120) -> list[dict]:
    """`worker(rank, port)` in `world_size` new processes; their results by rank (a failing rank's traceback
    fails the calling test)."""
    codes = start_ranks(worker, world_size, out_dir, timeout)
    errors = [path.read_text() for path in sorted(out_dir.glob("rank*.err"))]
    assert not errors, "\n".join(errors)
    assert codes == [0] * world_size, f"rank exit codes {codes} (negative: killed by that signal), no traceback"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@contextlib.contextmanager
def gloo_world(rank: int, port: int, world_size: int) -> Iterator[WorldInfo]:
    """This rank's place in a gloo process group of `world_size` ranks on one torch thread; left on exit."""
    torch.set_num_threads(1)
    world = WorldInfo(rank=rank, world_size=world_size, local_rank=rank)
    init_process_group(world, backend="gloo", init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield world
    finally:
        leave_process_group(world)
    assert not torch.distributed.is_initialized()


def ranks_fixture(worker: Worker, world_size: int, timeout: float = 120) -> Callable[..., list[dict]]:
    """A module-scoped fixture `rank_results`: what `worker` returns in each of `world_size` spawned processes."""

    @pytest.fixture(scope="module")
    def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
        return run_ranks(worker, world_size, tmp_path_factory.mktemp("ranks"), timeout)

    return rank_results
