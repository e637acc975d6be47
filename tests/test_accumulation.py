"""Exact gradient accumulation (trainer.accumulation=exact) against one step on the whole batch, in float64.

`update_freq=4` micro-batches of 8 against one step at 32 for CLIP, SimCLR, SLIP, SigLIP, VICReg and Barlow
Twins, with ViT and ModifiedResNet towers; random-state replay; buffers; distributed; AMP; resume inside an accumulation window;
and `independent` accumulation against what it has always computed.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from accumulation_helpers import (EOT, OBJECTIVES, TEXT, gradients, image_size, make_batch, parameters,
                                  relative_errors, split, tiny_task, train_steps, worst)
from rank_helpers import run_ranks
from slip.app.accumulation import exact_backward
from slip.checkpoint import read_checkpoint
from slip.data.loader import collate
from slip.data.synthetic import photo_like
from slip.data.transforms import CLIP_MEAN, CLIP_STD, build_multiview
from slip.distributed import WorldInfo, convert_sync_batchnorm, init_process_group, leave_process_group, make_gather
from slip.app.engine import Trainer, TrainerSettings
from slip.app.task import TrainTask
from train_helpers import FAST, SMALL_VIT, compose_config

MICRO, K = 8, 4
EXACT = 1e-10


def change(task: TrainTask, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training changed: the difference of every float tensor, the new value of every integer one."""
    return {name: value - before[name] if value.is_floating_point() else value
            for name, value in parameters(task).items()}


def assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], bound: float = EXACT) -> None:
    name, error = worst(relative_errors(got, want))
    print(f"worst relative error {error:.1e} ({name})")  # shown with pytest -s: the figures the README quotes
    assert error <= bound, f"{name}: relative error {error:.3g} > {bound:g}"


def big_batch_step_change(tower: str, objective: str, batch: dict, tmp_path: Path, **model) -> dict:
    task = tiny_task(tower, objective, **model)
    before = parameters(task)
    train_steps(task, [batch], tmp_path / "big", update_freq=1)
    return change(task, before)


def exact_step_change(tower: str, objective: str, batch: dict, tmp_path: Path, **model) -> dict:
    task = tiny_task(tower, objective, **model)
    before = parameters(task)
    train_steps(task, split(batch, K), tmp_path / "exact", update_freq=K, accumulation="exact")
    return change(task, before)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_exact_accumulation_of_a_vit_equals_one_step_on_the_whole_batch(objective: str, tmp_path: Path) -> None:
    batch = make_batch(tiny_task("vit", objective), MICRO * K)
    # Plain SGD: the weight change is -lr x the gradient, so this compares gradients and next weights.
    assert_exact(exact_step_change("vit", objective, batch, tmp_path),
                 big_batch_step_change("vit", objective, batch, tmp_path))


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_exact_accumulation_of_a_resnet_equals_the_step_with_batchnorm_over_each_micro_batch(
        objective: str, tmp_path: Path) -> None:
    """The ResNet tower's BatchNorm normalises each micro-batch, as each GPU of a data-parallel run does."""
    reference = tiny_task("resnet", objective).train()
    before = parameters(reference)
    batch = make_batch(reference, MICRO * K)
    chunks = split(batch, K)
    features = [reference.model.tower_features(chunk) for chunk in chunks]
    whole = {key: torch.cat([part[key] for part in features]) for key in features[0]}
    reference.finish(whole)["loss"].backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()  # as train_steps
    want = change(reference, before)
    views = sum(key != "text" for key in features[0])
    assert int(want["model.visual.bn1.num_batches_tracked"]) == K * views  # one update per chunk and view
    assert_exact(exact_step_change("resnet", objective, batch, tmp_path), want)
    # ... which is not the step on 32 with BatchNorm over all of it.
    name, error = worst(relative_errors(big_batch_step_change("resnet", objective, batch, tmp_path), want))
    assert error > 1e-3


def test_exact_accumulation_of_views_finished_on_the_device_equals_one_step_on_the_whole_batch(
        tmp_path: Path) -> None:
    # The engine keeps the loader's batches (uint8 crops and drawn operations) and finishes each micro-batch for its
    # pass and again for its replay.
    views = build_multiview(("image", "text", "aug1", "aug2"), image_size(tiny_task("vit", "slip")), CLIP_MEAN,
                            CLIP_STD, context_length=TEXT["context_length"], backend="device")
    torch.manual_seed(5)
    samples = [views(photo_like(48, 40, seed), f"photo number {seed}") for seed in range(MICRO * K)]
    samples = [{**sample, "text": sample["text"].clamp(max=EOT)} for sample in samples]  # the tiny vocabulary

    def prepare(batch: dict, device: torch.device) -> dict:
        return {key: value.double() if value.is_floating_point() else value
                for key, value in views.to_device(batch, device).items()}

    micro_batches = [collate(samples[i:i + MICRO]) for i in range(0, MICRO * K, MICRO)]
    # The reference step sees the views finished a micro-batch at a time too (finishing a batch of 32 at once
    # rounds float32 differently), concatenated.
    finished = [prepare(batch, torch.device("cpu")) for batch in micro_batches]
    whole = {key: torch.cat([batch[key] for batch in finished]) for key in finished[0]}
    changes = {}
    for mode, batches, update_freq, prepare_batch in (("big", [whole], 1, None),
                                                      ("exact", micro_batches, K, prepare)):
        task = tiny_task("vit", "slip")
        before = parameters(task)
        train_steps(task, batches, tmp_path / mode, update_freq=update_freq, accumulation="exact",
                    prepare_batch=prepare_batch)
        changes[mode] = change(task, before)
    assert_exact(changes["exact"], changes["big"])


def run_exact_backward(task: TrainTask, micro_batches: list[dict], encode=None, finish=None,
                       device: torch.device = torch.device("cpu")) -> dict:
    task.zero_grad(set_to_none=True)
    exact_backward(micro_batches, encode or task.model.tower_features, finish or task.finish,
                   lambda loss: loss.backward(), task.model, device)
    return gradients(task)


def plain_gradients(task: TrainTask, batch: dict) -> dict:
    task.zero_grad(set_to_none=True)
    task(batch)["loss"].backward()
    return gradients(task)


def test_a_resnet_with_frozen_batchnorm_statistics_accumulates_to_the_whole_batch_step() -> None:
    task = tiny_task("resnet", "slip").train()
    task.model.visual.eval()  # BatchNorm with running statistics: samples no longer meet in the tower
    batch = make_batch(task, MICRO * K)
    assert_exact(run_exact_backward(task, split(batch, K)), plain_gradients(task, batch))


def chunked_gradients(task: TrainTask, micro_batches: list[dict]) -> dict:
    """Gradients of one graph over all micro-batches: the towers on each in turn, heads and objective on all."""
    task.zero_grad(set_to_none=True)
    features = [task.model.tower_features(chunk) for chunk in micro_batches]
    task.finish({key: torch.cat([part[key] for part in features]) for key in features[0]})["loss"].backward()
    return gradients(task)


def test_drop_path_takes_the_same_draws_when_micro_batches_are_replayed() -> None:
    task = tiny_task("vit", "slip", drop_path_rate=0.5).train()
    micro_batches = split(make_batch(task, MICRO * K), K)
    torch.manual_seed(7)
    want = chunked_gradients(task, micro_batches)
    after_reference = torch.rand(3)
    torch.manual_seed(7)
    got = run_exact_backward(task, micro_batches)
    assert_exact(got, want)
    assert torch.equal(torch.rand(3), after_reference)  # the random stream goes on as after one pass
    torch.manual_seed(8)
    other_draws = chunked_gradients(task, micro_batches)
    assert worst(relative_errors(other_draws, want))[1] > 1e-2  # so replaying other draws would show


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh runs it)")
def test_drop_path_replay_on_cuda_restores_the_device_generator() -> None:
    device = torch.device("cuda")
    task = tiny_task("vit", "slip", drop_path_rate=0.5).to(device).train()
    micro_batches = [{key: value.to(device) for key, value in chunk.items()}
                     for chunk in split(make_batch(task, MICRO * K), K)]
    torch.manual_seed(7)
    want = chunked_gradients(task, micro_batches)
    torch.manual_seed(7)
    assert_exact(run_exact_backward(task, micro_batches, device=device), want)
    torch.manual_seed(8)
    assert worst(relative_errors(chunked_gradients(task, micro_batches), want))[1] > 1e-2


@pytest.mark.parametrize(("norm", "exact"), [("batch", False), ("layer", True), ("none", True)])
def test_splitting_after_the_heads_is_exact_only_when_the_ssl_head_does_not_couple_samples(
        norm: str, exact: bool) -> None:
    """Why the engine caches tower features, not embeddings: the SSL head's BatchNorm must see the whole batch."""
    task = tiny_task("vit", "simclr", ssl_head_norm=norm).train()
    batch = make_batch(task, MICRO * K)
    after_heads = run_exact_backward(task, split(batch, K), encode=task.model, finish=task.objective)
    error = worst(relative_errors(after_heads, plain_gradients(task, batch)))[1]
    assert (error <= EXACT) == exact, error
    assert_exact(run_exact_backward(task, split(batch, K)), plain_gradients(task, batch))


def test_independent_accumulation_still_sums_the_micro_batch_losses_over_update_freq(tmp_path: Path) -> None:
    reference = tiny_task("vit", "slip").train()
    before = parameters(reference)
    batch = make_batch(reference, MICRO * K)
    for chunk in split(batch, K):
        (reference(chunk)["loss"] / K).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()  # as train_steps
    task = tiny_task("vit", "slip")
    train_steps(task, split(batch, K), tmp_path, update_freq=K, accumulation="independent")
    assert_exact(change(task, before), change(reference, before))


def test_exact_accumulation_resumes_exactly_after_sigterm_inside_an_accumulation_window(tmp_path: Path) -> None:
    steps, window = 3, 2

    def make() -> TrainTask:
        return tiny_task("vit", "slip", drop_path_rate=0.3)

    batches = split(make_batch(make(), MICRO * window * steps), window * steps)

    def adamw(task: TrainTask) -> torch.optim.Optimizer:
        return torch.optim.AdamW(task.parameters(), lr=1e-3, weight_decay=0.1)

    def run(task: TrainTask, run_dir: Path, loader=None) -> Trainer:
        return train_steps(task, batches, run_dir, steps=steps, optimizer=adamw(task), lr=1e-3,
                           update_freq=window, loader=loader)

    torch.manual_seed(5)
    uninterrupted = make()
    run(uninterrupted, tmp_path / "whole")

    def interrupted_loader(epoch: int, skip: int):
        for index, batch in enumerate(batches[skip:], start=skip):
            if index == window + 1:  # the second micro-batch of step 2: SIGTERM arrives mid-window
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    torch.manual_seed(5)
    first = run(make(), tmp_path / "split", interrupted_loader)
    assert first.state.step == 2  # the window was finished, then saved
    task = make()
    trainer = Trainer(task, adamw(task), lambda step: 1e-3, first.settings, WorldInfo(), tmp_path / "split",
                      total_steps=steps, steps_per_epoch=steps)
    trainer.load_state_dict(read_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt"))
    trainer.fit(lambda epoch, skip: iter(batches[skip:]))
    assert trainer.state.step == steps
    assert_exact(parameters(task), parameters(uninterrupted), bound=1e-13)


def test_bf16_exact_accumulation_runs_the_towers_in_bf16_and_matches_the_bf16_big_batch_step(tmp_path: Path) -> None:
    seen: list[torch.dtype] = []
    changes = {}
    for name, update_freq, batches in (("big", 1, 1), ("exact", K, K)):
        task = tiny_task("vit", "slip", dtype=torch.float32)
        # A linear layer's output (the tower's last op, a LayerNorm, runs in fp32 under autocast).
        qkv = task.model.visual.blocks[0].attn.qkv
        hook = qkv.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        before = parameters(task)
        batch = make_batch(task, MICRO * K, dtype=torch.float32)
        train_steps(task, split(batch, batches), tmp_path / name, update_freq=update_freq, precision="bf16", lr=0.1)
        hook.remove()
        changes[name] = change(task, before)
    assert set(seen) == {torch.bfloat16}
    # bf16 rounds at about 4e-3; the two differ only in how the towers' products are split into micro-batches.
    name, error = worst(relative_errors(changes["exact"], changes["big"]))
    assert error < 0.05, f"{name}: {error}"


def test_fp16_overflow_in_exact_accumulation_skips_the_step_and_lowers_the_scale(tmp_path: Path) -> None:
    task = tiny_task("vit", "slip", dtype=torch.float32)
    before = parameters(task)
    batch = make_batch(task, MICRO * K, dtype=torch.float32)
    trainer = train_steps(task, split(batch, K), tmp_path / "overflow", update_freq=K, precision="fp16",
                          init_grad_scale=2.0**40)  # the scaled feature gradients overflow fp16's 65504
    assert trainer.scaler.get_scale() == 2.0**39
    assert all(torch.equal(value, before[name]) for name, value in task.named_parameters())  # buffers move
    task = tiny_task("vit", "slip", dtype=torch.float32)
    trainer = train_steps(task, split(batch, K), tmp_path / "fits", update_freq=K, precision="fp16",
                          init_grad_scale=2.0**8)
    assert trainer.scaler.get_scale() == 2.0**8
    assert not torch.equal(parameters(task)["model.visual.cls_token"], before["model.visual.cls_token"])


def test_accumulation_mode_is_validated() -> None:
    with pytest.raises(ValueError, match=r"trainer\.accumulation must be one of \['exact', 'independent'\]"):
        TrainerSettings(accumulation="sum")


# ---------------------------------------------------------------- slip.train end to end


def final_state(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")


def test_train_with_update_freq_equals_train_with_the_whole_batch(tmp_path: Path) -> None:
    """data.batch_size=8 x update_freq=2 reads the same 16 samples per step as data.batch_size=16."""
    from slip.app.train import train

    common = [*FAST, *SMALL_VIT, "loss=slip", "trainer.max_steps=3", "trainer.save_every=0"]
    whole = train(compose_config(*common, "data.batch_size=16"), tmp_path / "whole")
    exact = train(compose_config(*common, "data.batch_size=8", "trainer.update_freq=2"), tmp_path / "exact")
    independent = train(compose_config(*common, "data.batch_size=8", "trainer.update_freq=2",
                                       "trainer.accumulation=independent"), tmp_path / "independent")
    assert len(whole["history"]) == len(exact["history"]) == 3
    for step, row in enumerate(whole["history"]):  # each loss is computed with the weights of the step before
        assert exact["history"][step]["loss"] == pytest.approx(row["loss"], rel=1e-5)
    assert independent["history"][0]["loss"] != pytest.approx(whole["history"][0]["loss"], rel=1e-3)
    # Weights are compared in float64 above: in float32, AdamW turns the rounding noise of gradients that are
    # zero in exact arithmetic (key biases, biases before a BatchNorm) into steps of +-lr.
    want, got = final_state(tmp_path / "whole"), final_state(tmp_path / "exact")
    assert want["state"]["samples_seen"] == got["state"]["samples_seen"] == 48


def test_bf16_training_runs_end_to_end_close_to_fp32(tmp_path: Path) -> None:
    from slip.app.train import train

    common = [*FAST, *SMALL_VIT, "loss=slip", "trainer.max_steps=2", "trainer.update_freq=2", "data.batch_size=8"]
    fp32 = train(compose_config(*common, "trainer.precision=fp32"), tmp_path / "fp32")
    bf16 = train(compose_config(*common, "trainer.precision=bf16"), tmp_path / "bf16")
    assert bf16["finished"]
    assert bf16["history"][0]["loss"] == pytest.approx(fp32["history"][0]["loss"], rel=2e-2)
    assert bf16["history"][0]["loss"] != fp32["history"][0]["loss"]  # autocast did run in bf16


# ---------------------------------------------------------------- two gloo processes

WORLD = 2
DISTRIBUTED_OBJECTIVES = ("slip", "siglip")


def _rank_worker(rank: int, port: int) -> dict:
    """One rank: its half of the global batch, as K micro-batches, through the engine's exact accumulation."""
    torch.set_num_threads(1)
    world = WorldInfo(rank=rank, world_size=WORLD, local_rank=rank)
    init_process_group(world, backend="gloo", init_method=f"tcp://127.0.0.1:{port}")
    results = {}
    for objective in DISTRIBUTED_OBJECTIVES:
        task = tiny_task("vit", objective)
        task.objective.set_gather(make_gather(world))
        if task.model.image_mlp is not None:
            convert_sync_batchnorm(task.model.image_mlp)
        before = parameters(task)
        batch = make_batch(task, MICRO * K * WORLD)
        mine = {key: value.chunk(WORLD)[rank] for key, value in batch.items()}
        with tempfile.TemporaryDirectory() as run_dir:
            train_steps(task, split(mine, K), Path(run_dir), update_freq=K, world=world)
        results[objective] = change(task, before)
    leave_process_group(world)
    return results


def test_two_gloo_ranks_of_micro_batches_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    ranks = run_ranks(_rank_worker, WORLD, tmp_path, timeout=180)
    for objective in DISTRIBUTED_OBJECTIVES:
        want = big_batch_step_change("vit", objective, make_batch(tiny_task("vit", objective), MICRO * K * WORLD),
                                     tmp_path / f"single-{objective}")
        for result in ranks:
            assert_exact(result[objective], want)
