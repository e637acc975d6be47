"""Multi-node launch on one machine: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, gloo, one process each),
as the README's multi-node command runs them, sharded with trainer.strategy=fsdp; the run equals one process at the
same global batch, and continues on one process under DDP, in float64."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rank_helpers import free_port
from slip.app.run_layout import SHARDED_CHECKPOINT_IN_RUN
from slip.app.train import train
from slip.sharded_checkpoint import read_sharded_meta
from train_helpers import EXACT_RUN, assert_same_run, compose_config, losses_by_step, subprocess_env, weights_of


def test_two_torchrun_nodes_of_one_process_equal_one_process_and_continue_on_one_process_under_ddp(
        tmp_path: Path, exact_run_at_batch_8: tuple[dict[int, float], dict]) -> None:
    common = [*EXACT_RUN, f"output_root={tmp_path}"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
         f"--rdzv_endpoint={endpoint}", "--rdzv_id=slip-test", "-m", "slip.train", *common, "data.batch_size=4",
         "trainer.strategy=fsdp", "trainer.stop_after=3"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=subprocess_env(OMP_NUM_THREADS="1")) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    run_dir = tmp_path / "test"
    meta = read_sharded_meta(run_dir / SHARDED_CHECKPOINT_IN_RUN)
    assert meta["processes"] == 2 and meta["state"]["step"] == 3
    two = json.loads((run_dir / "results.json").read_text())
    one_losses, one_weights = exact_run_at_batch_8
    assert losses_by_step(two) == pytest.approx({step: one_losses[step] for step in (1, 2, 3)}, rel=1e-10, abs=0)
    resumed = train(compose_config(*common, "data.batch_size=8", "trainer.strategy=ddp"), run_dir)
    assert_same_run(losses_by_step(resumed), weights_of(run_dir), one_losses, one_weights)
