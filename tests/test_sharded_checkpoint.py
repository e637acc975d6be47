"""Sharded checkpoints (trainer.strategy=fsdp): resume at another world size and under DDP, crash and full-disk
safety during a sharded save, and export, in float64 on gloo ranks."""
from __future__ import annotations

import errno
import json
import functools
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from accumulation_helpers import make_batch, relative_errors, tiny_task, train_steps, worst
from rank_helpers import gloo_world, run_ranks
from slip.app.engine import TrainingError
from slip.app.evaluate import default_output_dir, find_checkpoints
from slip.app.export import TARGETS, export
from slip.app.finetune import source_checkpoint
from slip.classifier import classifier_from_model
from slip.pretrained import load_pretrained
from slip.app.run_layout import CHECKPOINT_IN_RUN, SHARDED_CHECKPOINT_IN_RUN
from slip.distributed import WorldInfo, convert_sync_batchnorm, make_gather
from slip.sharded_checkpoint import as_full_tensor, is_sharded_checkpoint, read_sharded, staging_path

GLOBAL, STEPS = 12, 3  # a global batch that 1, 2 and 3 ranks split evenly
# OpenAI's ViT layout at 64 channels a head: what open_clip and transformers hold (the export test's targets)
MODEL = dict(openai_layout=True, vision_width=64, vision_heads=1, text_width=64, text_heads=1)
EXACT = 1e-10


def steps_of_batches() -> list[dict]:
    task = tiny_task("vit", "slip", **MODEL)
    return [make_batch(task, GLOBAL, seed=20 + step) for step in range(STEPS)]


def run(run_dir: Path, world: WorldInfo, strategy: str, resume: bool = False, **settings) -> dict:
    """SLIP on a tiny ViT with SGD with momentum (optimizer state to reshard; AdamW would turn the rounding noise
    of gradients that are zero in exact arithmetic, a bias before BatchNorm, into steps of size lr), three steps of the same global batch at any world size: this rank's share."""
    task = tiny_task("vit", "slip", **MODEL)
    if world.is_distributed:
        task.objective.set_gather(make_gather(world))
        convert_sync_batchnorm(task.model.image_mlp)
    mine = [{key: value.chunk(world.world_size)[world.rank] for key, value in batch.items()}
            for batch in steps_of_batches()]
    trainer = train_steps(task, mine, run_dir, steps=STEPS, world=world, precision="fp64", strategy=strategy,
                          optimizer=torch.optim.SGD(task.parameters(), lr=0.1, momentum=0.9), resume=resume,
                          **settings)
    return {"weights": {key: value.detach().clone() for key, value in as_full_tensor(task.state_dict()).items()},
            "losses": {entry["step"]: entry["loss"] for entry in trainer.history}, "step": trainer.state.step}


def _ranks(rank: int, port: int, world_size: int, run_dir: str, strategy: str, **settings) -> dict:
    with gloo_world(rank, port, world_size) as world:
        return run(Path(run_dir), world, strategy, **settings)


def assert_equal_runs(got: dict, want: dict, label: str) -> None:
    name, error = worst(relative_errors(got["weights"], want["weights"]))
    shared = sorted(set(got["losses"]) & set(want["losses"]))
    print(f"{label}: weights {error:.1e} ({name}), losses of steps {shared}: "
          f"{[got['losses'][s] for s in shared]} vs {[want['losses'][s] for s in shared]}")
    assert error <= EXACT, f"{label}: {name} relative error {error:.3g}"
    assert [got["losses"][s] for s in shared] == pytest.approx([want["losses"][s] for s in shared], rel=EXACT)


def assert_resumes_on_ranks(run_dir: Path, world_size: int, strategy: str, uninterrupted: dict, out_dir: Path,
                            label: str) -> None:
    """Resuming the run in `run_dir` on `world_size` ranks under `strategy` ends where the uninterrupted run does."""
    out_dir.mkdir()
    ranks = run_ranks(functools.partial(_ranks, world_size=world_size, run_dir=str(run_dir), strategy=strategy,
                                        resume=True), world_size, out_dir, timeout=300)
    for rank, result in enumerate(ranks):
        assert result["step"] == STEPS and sorted(result["losses"]) == [1, 2, 3]  # step 1: the restored history
        assert_equal_runs(result, uninterrupted, f"{label}, rank {rank}")


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank FSDP run stopped after its first step: its run dir, holding checkpoints/last.dcp."""
    run_dir = tmp_path_factory.mktemp("fsdp2")
    run_ranks(functools.partial(_ranks, world_size=2, run_dir=str(run_dir), strategy="fsdp", stop_after=1), 2,
              tmp_path_factory.mktemp("ranks"), timeout=300)
    assert is_sharded_checkpoint(run_dir / SHARDED_CHECKPOINT_IN_RUN)
    assert not (run_dir / CHECKPOINT_IN_RUN).exists()
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process under DDP, three steps without a stop: its results, and its run dir (checkpoints/last.pt)."""
    run_dir = tmp_path_factory.mktemp("whole")
    return {**run(run_dir, WorldInfo(), "ddp"), "run_dir": run_dir}


def test_a_sharded_checkpoint_of_two_ranks_continues_on_three_ranks_exactly(two_rank_checkpoint: Path,
                                                                             uninterrupted: dict,
                                                                             tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run_dir)
    assert_resumes_on_ranks(run_dir, 3, "fsdp", uninterrupted, tmp_path / "ranks", "fsdp 2 -> 3 ranks")
    # Its final sharded checkpoint exports to every target as the DDP run's last.pt does.
    for target in TARGETS:
        exported = {}
        for name, checkpoint in [("fsdp", run_dir / SHARDED_CHECKPOINT_IN_RUN),
                                 ("ddp", uninterrupted["run_dir"] / CHECKPOINT_IN_RUN)]:
            export(checkpoint, target, tmp_path / f"{target}-{name}")
            exported[name] = load_pretrained(tmp_path / f"{target}-{name}" /
                                             ("model.safetensors" if target == "safetensors" else "")).state_dict()
        name, error = worst(relative_errors(exported["fsdp"], exported["ddp"]))
        print(f"export to {target}: worst relative error {error:.1e} ({name})")
        assert error <= EXACT, f"{target}: {name} relative error {error:.3g}"


def test_a_sharded_checkpoint_continues_in_one_process_under_ddp_exactly(two_rank_checkpoint: Path,
                                                                         uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run_dir)
    result = run(run_dir, WorldInfo(), "ddp", resume=True)
    assert_equal_runs(result, uninterrupted, "fsdp 2 ranks -> ddp 1 process")
    assert (run_dir / CHECKPOINT_IN_RUN).is_file() and not (run_dir / SHARDED_CHECKPOINT_IN_RUN).exists()


def test_a_ddp_checkpoint_continues_on_two_fsdp_ranks_exactly(uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, WorldInfo(), "ddp", stop_after=1)
    assert (run_dir / CHECKPOINT_IN_RUN).is_file()
    assert_resumes_on_ranks(run_dir, 2, "fsdp", uninterrupted, tmp_path / "ranks", "ddp 1 process -> fsdp 2 ranks")
    assert is_sharded_checkpoint(run_dir / SHARDED_CHECKPOINT_IN_RUN) and not (run_dir / CHECKPOINT_IN_RUN).exists()


def test_a_sharded_checkpoint_is_read_whole_as_the_run_left_it(two_rank_checkpoint: Path) -> None:
    whole = read_sharded(two_rank_checkpoint / SHARDED_CHECKPOINT_IN_RUN)
    assert whole["state"]["step"] == 1 and whole["processes"] == 2 and len(whole["rng"]) == 2
    assert set(whole["model"]) == set(tiny_task("vit", "slip", **MODEL).model.state_dict())
    assert all(isinstance(key, str) for key in whole["optimizer"]["state"])  # by parameter name
    assert not staging_path(two_rank_checkpoint / SHARDED_CHECKPOINT_IN_RUN).exists()


def test_evaluation_fine_tuning_and_load_pretrained_read_a_sharded_checkpoint(two_rank_checkpoint: Path) -> None:
    checkpoint = two_rank_checkpoint / SHARDED_CHECKPOINT_IN_RUN
    assert find_checkpoints(two_rank_checkpoint) == [checkpoint] == find_checkpoints(checkpoint)
    assert default_output_dir(checkpoint) == two_rank_checkpoint / "eval"
    assert source_checkpoint(str(two_rank_checkpoint)) == checkpoint
    saved = read_sharded(checkpoint)["model"]
    model = load_pretrained(checkpoint)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name].to(value.dtype)), name  # as built: float32
    classifier = classifier_from_model(model, num_classes=3)
    for name, value in classifier.tower.state_dict().items():
        assert torch.equal(value, saved[f"visual.{name}"].to(value.dtype)), name


# ---------------------------------------------------------------- faults during a sharded save (the fault suite's)

def _full_disk_on_rank_1(rank: int, port: int, run_dir: str) -> dict:
    """Rank 1's disk fills during the second save (step 2) of a 2-rank FSDP run that saves every step."""
    from torch.distributed.checkpoint import FileSystemWriter

    writes = []
    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        writes.append(plan)
        if rank == 1 and len(writes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data  # this forked rank's own copy of the class
    with gloo_world(rank, port, 2) as world:
        try:
            run(Path(run_dir), world, "fsdp", save_every=1)
        except TrainingError as error:
            return {"error": str(error)}
    return {"error": None}


def test_a_full_disk_on_one_rank_during_a_sharded_save_stops_every_rank_and_keeps_the_previous_checkpoint(
        uninterrupted: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "ranks").mkdir()
    ranks = run_ranks(functools.partial(_full_disk_on_rank_1, run_dir=str(run_dir)), 2, tmp_path / "ranks",
                      timeout=300)
    for rank, result in enumerate(ranks):
        assert result["error"] is not None, f"rank {rank} did not stop"
        assert "could not save step 2" in result["error"] and "previous checkpoint (step 1) is intact" in \
            result["error"] and "\n" not in result["error"], result["error"]
    assert "No space left on device" in ranks[1]["error"]
    checkpoint = run_dir / SHARDED_CHECKPOINT_IN_RUN
    assert read_sharded(checkpoint)["state"]["step"] == 1
    assert not staging_path(checkpoint).exists()  # the failed save's shards are gone, not left to fill the disk
    assert_resumes_on_ranks(run_dir, 2, "fsdp", uninterrupted, tmp_path / "again", "after ENOSPC, resumed")


def _killed_in_second_save(rank: int, port: int, run_dir: str) -> dict:
    """Rank 1 dies (kill -9) inside the second sharded save, after writing part of its shard."""
    import torch.distributed.checkpoint as dcp

    saves = []
    original = dcp.save

    def save(state_dict, *, checkpoint_id, **options):
        saves.append(checkpoint_id)
        if rank == 1 and len(saves) == 2:
            (Path(checkpoint_id) / "__1_0.distcp").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(state_dict, checkpoint_id=checkpoint_id, **options)

    dcp.save = save
    with gloo_world(rank, port, 2) as world:
        return run(Path(run_dir), world, "fsdp", save_every=1)


def test_kill_9_of_one_rank_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(
        uninterrupted: dict, tmp_path: Path) -> None:
    from rank_helpers import start_ranks

    run_dir = tmp_path / "run"
    (tmp_path / "ranks").mkdir()
    codes = start_ranks(functools.partial(_killed_in_second_save, run_dir=str(run_dir)), 2, tmp_path / "ranks",
                        timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes  # rank 0 stops on its lost peer
    checkpoint = run_dir / SHARDED_CHECKPOINT_IN_RUN
    assert read_sharded(checkpoint)["state"]["step"] == 1
    # Rank 0, cut off inside the save, removes the staging directory; had it been killed too (torchrun stops every
    # worker when one dies), the next save clears it: as here, where it is put back as such a kill leaves it.
    staging_path(checkpoint).mkdir(exist_ok=True)
    (staging_path(checkpoint) / "__1_0.distcp").write_bytes(b"half a shard")
    assert_resumes_on_ranks(run_dir, 2, "fsdp", uninterrupted, tmp_path / "again", "after kill -9, resumed")
    assert not staging_path(checkpoint).exists()


def test_slip_eval_scores_a_sharded_checkpoint_into_its_run_dir(two_rank_checkpoint: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from slip.app.evaluate import evaluate
    from train_helpers import CONF_DIR

    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_checkpoint, run_dir)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"checkpoint={run_dir}", f"feature_cache={tmp_path / 'cache'}",
                                         "catalog.synthetic.train.num_samples=48", "catalog.synthetic.test.num_samples=24",
                                         "linear_probe.max_iter=10", "linear_probe.refinements=0",
                                         "tasks.zeroshot=[]", "tasks.retrieval=[]"])
    evaluate(cfg)
    probe = json.loads((run_dir / "eval" / "linear_probe.json").read_text())
    # the scores name the checkpoint and step they belong to
    assert probe["checkpoint"] == str(run_dir / SHARDED_CHECKPOINT_IN_RUN) and probe["step"] == 1
    assert (run_dir / "eval" / "knn.json").is_file()
