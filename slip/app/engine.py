"""The training loop: AMP, accumulation, clipping, schedule, checkpoints, resume, preemption, telemetry."""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slip.app.accumulation import exact_backward
from slip.checkpoint import FORMAT_NAME, FORMAT_VERSION
from slip.data.loader import batch_rows, batch_to_device
from slip.distributed import WorldInfo, all_ranks, any_rank, resolve_device
from slip.app.monitor import Monitor, peak_memory_mib
from slip.app.precision import autocast_dtype, cast_floats, parameter_dtype
from slip.app.preemption import EvaluationInterrupted, PreemptionFlag
from slip.random_state import rng_state, set_rng_state
from slip.app.run_layout import CHECKPOINTS_IN_RUN
from slip.app.strategy import make_strategy
from slip.sharded_checkpoint import is_sharded_checkpoint, remove_path
from slip.app.task import TrainTask
from slip.app.trainer_settings import TrainerSettings

LoaderForEpoch = Callable[[int, int], Iterable[dict]]
"""(epoch, number of batches to skip) -> the batches of that epoch."""
PrepareBatch = Callable[[Mapping[str, Any], torch.device], dict]
"""(loader batch, device) -> the model's batch on that device."""


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad samples, repeated non-finite losses); the message says why."""


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    nonfinite_in_a_row: int = 0


class Trainer:
    """Runs `fit`: one instance per training run.

    `task` is a `slip.app.task.TrainTask`, or another task with its interface (`slip.app.finetune_task`).
    `evaluate(model, progress=callback) -> metrics` validates `task.model` (e.g.
    `slip.eval.zeroshot.ZeroShotEvaluator`; its `len` is the number of images it scores, when it has one, and its
    `title` names it on the console).
    """

    def __init__(
        self,
        task: TrainTask,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        settings: TrainerSettings,
        world: WorldInfo,
        run_dir: Path,
        total_steps: int,
        steps_per_epoch: int,
        config_text: str = "",
        evaluate: Callable[..., dict[str, float]] | None = None,
    ) -> None:
        self.task, self.optimizer, self.schedule = task, optimizer, schedule
        self.settings, self.world, self.run_dir = settings, world, run_dir
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.config_text, self.evaluate = config_text, evaluate
        self.device = resolve_device(settings.device, world.local_rank)
        self._prepare_batch: PrepareBatch = batch_to_device  # fit() takes the MultiView's own
        self.dtype = autocast_dtype(settings.precision, self.device)
        self.strategy = make_strategy(settings.strategy, settings.fsdp, world, self.device)
        self.scaler = self.strategy.grad_scaler(self.dtype == torch.float16, settings.init_grad_scale)
        self.state = TrainState()
        self._first_step = 0  # the step this invocation started from (trainer.stop_after counts from it)
        self.checkpoint_path = run_dir / self.strategy.checkpoint_in_run
        self.saved_step: int | None = None  # the step of checkpoint_path (saved by this run, or resumed from)
        self.validated_step: int | None = None  # the step whose weights `last_eval` scored
        self.monitor = Monitor(run_dir, total_steps, settings.log_every, enabled=world.is_main)
        self.last_eval: dict[str, float] = {}
        self.scheduled_lr = schedule(0)  # the base lr of the last step (param groups may scale it)
        self.history: list[dict[str, float]] = []
        self.parameter_dtype = parameter_dtype(settings.precision)
        task.to(self.device, self.parameter_dtype)  # to(device, None) keeps the dtype
        self.wrapped: nn.Module = self.strategy.wrap(task, optimizer, self.dtype)
        # Exact accumulation runs towers, heads and objective as separate passes, outside DDP's forward. A task
        # whose loss is a mean over samples is already exact when micro-batch gradients are summed.
        self.exact_accumulation = (settings.update_freq > 1 and settings.accumulation == "exact"
                                   and not task.per_sample_loss)
        if self.exact_accumulation:
            self._encode, self._finish = task.encode, task.finish
        if settings.compile:
            self.wrapped = torch.compile(self.wrapped)
            if self.exact_accumulation:
                self._encode, self._finish = torch.compile(self._encode), torch.compile(self._finish)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; model weights in the format load_pretrained reads."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "processes": self.world.world_size,
            **self.task.checkpoint_state(),
            "optimizer": self.strategy.optimizer_state(self.task, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": all_ranks(rng_state(), self.world),
            "config": self.config_text,
            "history": self.history,
        }

    def save(self) -> None:
        """Atomically replace the latest checkpoint (`last.pt` written by rank 0, or `last.dcp` by every rank,
        per trainer.strategy; the other is removed once this one is in place).

        A failed write (e.g. a full disk) raises TrainingError saying which step was lost and which is kept,
        on every rank, so that none is left waiting for the writer.
        """
        checkpoint = self.state_dict()
        failure: TrainingError | None = None
        try:
            self.strategy.write(checkpoint, self.checkpoint_path)
        except OSError as error:
            failure = self._save_failure(error)
        else:
            self.saved_step = self.state.step
            if self.world.is_main:
                for other in CHECKPOINTS_IN_RUN:
                    if self.run_dir / other != self.checkpoint_path:
                        remove_path(self.run_dir / other)
        if any_rank(failure is not None, self.world, self.device):
            if failure is not None:
                raise failure
            raise TrainingError(f"rank {self.world.rank}: stopping because rank 0 could not save step "
                                f"{self.state.step} to {self.checkpoint_path}; its error says what is kept")

    def _save_failure(self, error: OSError) -> TrainingError:
        if not self.checkpoint_path.exists():
            kept = "there was no earlier checkpoint"
        elif self.saved_step is not None:
            kept = f"the previous checkpoint (step {self.saved_step}) is intact"
        else:
            kept = "the previous checkpoint is intact"
        reason = error.__cause__ if isinstance(error.__cause__, OSError) else error  # atomic_save's cause
        failure = TrainingError(f"could not save step {self.state.step} to {self.checkpoint_path} "
                                f"({reason.strerror or reason}); {kept}")
        failure.__cause__ = error
        return failure

    def resume(self, path: Path, checkpoint: Mapping[str, Any]) -> None:
        """Continue from `checkpoint`, read from `path` (a sharded directory: its `read_sharded_meta`), whichever
        strategy and number of processes wrote it."""
        if is_sharded_checkpoint(path):
            checkpoint = self.strategy.read_sharded(path, self.state_dict)
        self.load_state_dict(checkpoint)

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (this rank's RNG included), saved under either strategy."""
        checkpoint = self.strategy.place(dict(checkpoint), self.task.checkpoint_state())
        self.task.load_checkpoint_state(checkpoint)
        self.strategy.load_optimizer_state(self.task, self.optimizer, checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["state"])
        self.history = list(checkpoint.get("history", []))
        self.saved_step = self.state.step
        rng = checkpoint["rng"]
        set_rng_state(rng[self.world.rank] if self.world.rank < len(rng) else rng[0])

    # ------------------------------------------------------------------ the loop

    def _account_bad_samples(self, batch: dict) -> None:
        skipped = batch.pop("_skipped", None) or {}
        examples = batch.pop("_skipped_examples", None) or []
        counts = Counter(self.state.skipped)
        counts.update({k: int(v) for k, v in skipped.items()})
        self.state.skipped = dict(counts)
        bad = sum(counts.values())
        looked_at = bad + self.state.samples_seen
        if bad and looked_at >= 100 and bad / looked_at > self.settings.max_bad_fraction:
            raise TrainingError(
                f"{bad} of {looked_at} samples were bad ({dict(counts)}), above trainer.max_bad_fraction="
                f"{self.settings.max_bad_fraction}; e.g. {'; '.join(examples[:3]) or 'see earlier batches'}"
            )

    def _optimizer_step(self, step_nonfinite: bool) -> bool:
        """Clip, step and update the scaler; skipped (grads dropped) after a non-finite loss."""
        if any_rank(step_nonfinite, self.world, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_in_a_row += 1
            self.monitor.message(f"step {self.state.step + 1}: non-finite loss, step skipped "
                                 f"({self.state.nonfinite_in_a_row} in a row)")
            if self.state.nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
                raise TrainingError(f"non-finite loss in {self.state.nonfinite_in_a_row} steps in a row, "
                                    f"the last at step {self.state.step + 1}; lower the lr or check the data")
            self.task.after_skipped_step()
            return False
        self.state.nonfinite_in_a_row = 0
        lr = self.scheduled_lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:  # "lr_scale": layer-wise lr decay (timm's param groups)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            self.strategy.clip_grad_norm(self.task.parameters(), self.settings.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips the update when the fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.monitor.message(f"step {self.state.step + 1}: fp16 gradients overflowed, step skipped, "
                                 f"loss scale lowered to {self.scaler.get_scale():g}")
            self.task.after_skipped_step()
            return False
        self.task.after_optimizer_step()
        return True

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _micro_step(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch on its own (its loss / update_freq); ranks sync only when `sync`."""
        with self.strategy.micro_step_sync(self.wrapped, sync):
            with self._autocast():
                result = self.wrapped(batch)
            self.scaler.scale(result["loss"] / self.settings.update_freq).backward()
        return {key: value.detach() for key, value in result.items()}

    def _exact_step(self, window: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Gradients of the objective over the whole window of micro-batches (`slip.app.accumulation`), all ranks'.

        `window` holds the loader's batches as they came (on the host; uint8 crops with the device backend): each
        is put on the device, and its deferred image work finished, for its pass and again for its replay, so the
        device holds one micro-batch's inputs at a time.
        """
        taught: list[dict[str, torch.Tensor]] = []  # the teacher's outputs, taken once per micro-batch

        def replay(loader_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
            return self._encode(self._prepare_batch(loader_batch, self.device))

        def encode(loader_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
            batch = self._prepare_batch(loader_batch, self.device)
            features = self._encode(batch)
            taught.append(self.task.teacher_outputs(batch))
            return features

        def finish(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self._finish(features, {key: torch.cat([part[key] for part in taught]) for key in taught[0]})

        result = exact_backward(window, encode, finish, lambda loss: self.scaler.scale(loss).backward(),
                                self.task.model, self.device, self._autocast, replay=replay,
                                sync=self.strategy.exact_sync(self.task))
        return {key: value.detach() for key, value in result.items()}

    def _log_step(self, results: list[dict[str, torch.Tensor]], step_time: float, data_wait: float,
                  images: int, scalars: Mapping[str, float]) -> None:
        values = {key: sum(float(result[key]) for result in results) / len(results) for key in results[0]}
        if self.world.is_distributed:  # report the mean over ranks: for our losses, the global-batch value
            keys = sorted(values)
            stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(stacked)
            values = {k: float(v) / self.world.world_size for k, v in zip(keys, stacked.tolist())}
        values["lr"] = self.scheduled_lr
        values.update(scalars)
        self.history.append({"step": self.state.step, **values})
        perf = {
            "images_per_second": images * self.world.world_size / max(step_time, 1e-9),
            "data_wait_fraction": data_wait / max(step_time, 1e-9),
            "peak_memory_mib": peak_memory_mib(self.device),
        }
        self.monitor.scalars(self.state.step, {**values, **perf})
        self.monitor.scalars(self.state.step, {k: float(v) for k, v in self.state.skipped.items()}, "data/skipped_")
        shown = {k: values[k] for k in self.task.console_metrics() if k in values}
        shown["img/s"] = perf["images_per_second"]
        skipped = sum(self.state.skipped.values())
        if skipped:
            shown["skipped"] = skipped
        self.monitor.progress(self.state.step, shown)

    def _run_evaluation(self, preempted: PreemptionFlag) -> bool:
        """Validate (with progress lines); False when SIGTERM came first or stopped it, which takes seconds."""
        if self.evaluate is None:
            return True
        size = len(self.evaluate) if hasattr(self.evaluate, "__len__") else None
        step, started = self.state.step, time.perf_counter()
        title = getattr(self.evaluate, "title", "validation")
        self.monitor.message(f"step {step}: {title}" + (f" on {size} images" if size else ""))
        reported = 0.0  # the share of the images last reported

        def progress(done: int, total: int) -> None:
            nonlocal reported
            if done == total or done / total >= reported + 0.25:
                reported = done / total
                self.monitor.message(f"validation: {done}/{total} images, {time.perf_counter() - started:.0f} s")

        self.task.model.eval()
        try:
            with preempted.interrupting(EvaluationInterrupted), self.strategy.gathered(self.task):
                self.last_eval = self.evaluate(self.task.model, progress=progress)
        except EvaluationInterrupted:
            self.monitor.message(f"validation at step {step} stopped by SIGTERM")
            return False
        finally:
            self.task.model.train()
        self.validated_step = step
        self.monitor.scalars(step, self.last_eval, "eval/")
        shown = ", ".join(f"{key} {value:.1f}" for key, value in self.last_eval.items())
        self.monitor.message(f"validation done in {time.perf_counter() - started:.0f} s: {shown}")
        return True

    def fit(self, loader_for_epoch: LoaderForEpoch, prepare_batch: PrepareBatch = batch_to_device) -> TrainState:
        """Train until `total_steps` optimizer steps are done, SIGTERM arrives, or an error stops it.

        `prepare_batch(batch, device)` puts each loader batch on the device (`MultiView.to_device` also finishes
        deferred image work there).
        """
        settings, state = self.settings, self.state
        self._prepare_batch = prepare_batch
        dtype = self.parameter_dtype
        if dtype is not None:
            self._prepare_batch = lambda batch, device: cast_floats(prepare_batch(batch, device), dtype)
        self._first_step = state.step
        self.monitor.begin(state.step)
        self.task.train()
        with PreemptionFlag() as preempted:
            try:
                while state.step < self.total_steps:
                    skip = state.step_in_epoch * settings.update_freq
                    batches = iter(loader_for_epoch(state.epoch, skip))
                    if self._train_epoch(batches, preempted):
                        self.save()
                        self.monitor.message(f"stopping early (SIGTERM or trainer.stop_after): saved step "
                                             f"{state.step} to {self.checkpoint_path}; run again to resume")
                        return state
                    state.epoch += 1
                    state.step_in_epoch = 0
                    self.save()
                if not self._run_evaluation(preempted):
                    self.monitor.message(f"the checkpoint of step {state.step} is saved ({self.checkpoint_path}); "
                                         "run again to validate")
            finally:
                self.monitor.close()
        return state

    def _train_epoch(self, batches: Iterator[dict], preempted: PreemptionFlag) -> bool:
        """One epoch (or what is left of it); True when stopped by preemption."""
        settings, state = self.settings, self.state
        window: list[dict] = []  # the micro-batches of this step, kept for exact accumulation's replays
        results: list[dict[str, torch.Tensor]] = []
        micro, data_wait, images = 0, 0.0, 0
        tick = time.perf_counter()
        while state.step_in_epoch < self.steps_per_epoch and state.step < self.total_steps:
            waited = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            data_wait += time.perf_counter() - waited
            self._account_bad_samples(batch)
            # Exact accumulation keeps the loader's batch and prepares it when it is encoded (twice, _exact_step).
            prepared = None if self.exact_accumulation else self._prepare_batch(batch, self.device)
            if state.step == 0 and micro == 0 and settings.log_images:
                shown = prepared if prepared is not None else self._prepare_batch(batch, self.device)
                for tag, grid in self.task.previews(shown).items():
                    self.monitor.images(tag, grid)
            micro += 1
            rows = batch_rows(batch)
            images += rows
            state.samples_seen += rows
            if prepared is not None:
                results.append(self._micro_step(prepared, sync=micro == settings.update_freq))
            elif micro < settings.update_freq:
                window.append(batch)
            else:
                results.append(self._exact_step(window + [batch]))
            if micro < settings.update_freq:
                continue
            self.strategy.finish_gradients(self.task, self.exact_accumulation)
            nonfinite = any(not bool(torch.isfinite(result["loss"])) for result in results)
            scalars = self.task.logged_scalars()  # before the step changes them: what this step's loss used
            stepped = self._optimizer_step(nonfinite)
            state.step += 1
            state.step_in_epoch += 1
            now = time.perf_counter()
            if stepped and (state.step % settings.log_every == 0 or state.step == self.total_steps or
                            self.monitor.interactive):
                self._log_step(results, now - tick, data_wait, images, scalars)
            window, results, micro, data_wait, images = [], [], 0, 0.0, 0
            if settings.save_every and state.step % settings.save_every == 0:
                self.save()
            if settings.eval_every and state.step % settings.eval_every == 0 and state.step < self.total_steps:
                self._run_evaluation(preempted)  # SIGTERM there stops the run below, as during a step
            if any_rank(preempted.requested, self.world, self.device) or (
                    settings.stop_after is not None and state.step - self._first_step >= settings.stop_after):
                return True
            tick = time.perf_counter()
        return False
