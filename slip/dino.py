"""DINO (Caron et al. 2021): self-distillation from a momentum teacher, with centring, sharpening and multi-crop.

The student embeds every crop (`global_crops` global views `aug1` ... `augN`, of which `aug1`, `aug2` are the SSL
views, and `local_crops` local views) through the model's SSL head; the momentum teacher
(`slip.teacher.MomentumTeacher`) embeds the global ones. Both pass through prototypes of their own: the last layer
of DINO's head, a bias-free linear map to `out_dim` scores whose weight rows are normalised (weight norm with its
gain fixed to 1, DINO's `norm_last_layer`), applied to the L2-normalised embedding. The student's prototypes are
trained; the teacher's are an EMA of them with the teacher's momentum (`after_teacher_update`).

loss = mean over (teacher global q, student crop v != q) of CE(softmax((t_q - c) / T_t), softmax(s_v / T_s)): only
the pairs of a view with itself are left out, as DINO's code does for any number of globals. The centre c moves
after each optimizer step to m c + (1 - m) × the mean teacher score over the global batch (every global, every
rank, every micro-batch of the step); T_t rises linearly from `warmup_teacher_temp` to `teacher_temp` over the
first `warmup_teacher_temp_steps` optimizer steps (DINO counts epochs; so does its linspace, whose last point is
`teacher_temp`).

Where this differs from DINO's head: the MLP before the prototypes is the model's SSL head (SLIP's
Linear-BN-ReLU ×2 by default; `loss=dino` sets DINO's 2048 hidden units without normalisation, keeping ReLU where
DINO uses GELU), and the prototypes are not frozen during the first epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slip.checks import non_negative_int, positive_int, positive_number, unit_interval
from slip.distributed import Gather, whole_tensor
from slip.inputs import SSL_VIEWS, global_views, local_views
from slip.losses import Objective
from slip.teacher import teacher_key

if TYPE_CHECKING:
    from slip.models.spec import ModelSpec

__all__ = ["DINOLoss"]


class DINOLoss(Objective):
    """DINO's self-distillation loss over global and local crops (see the module docstring)."""

    default_name = "dino"
    metric_suffixes = ("teacher_entropy",)
    teacher_views = SSL_VIEWS  # the default's; an instance's are its `global_crops` global views

    def __init__(self, out_dim: int = 65536, local_crops: int = 0, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, dim: int | None = None, gather: Gather | None = None,
                 name: str | None = None, global_crops: int = 2) -> None:
        super().__init__(gather, name)
        self.out_dim = positive_int("DINOLoss out_dim", out_dim)
        if isinstance(global_crops, bool) or not isinstance(global_crops, int) or global_crops < 2:
            raise ValueError(f"DINOLoss global_crops must be an integer >= 2, got {global_crops!r}")
        self.global_crops = global_crops
        self.local_crops = non_negative_int("DINOLoss local_crops", local_crops)
        self.student_temp = positive_number("DINOLoss student_temp", student_temp)
        self.teacher_temp = positive_number("DINOLoss teacher_temp", teacher_temp)
        self.warmup_teacher_temp = positive_number("DINOLoss warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_steps = non_negative_int("DINOLoss warmup_teacher_temp_steps",
                                                          warmup_teacher_temp_steps)
        self.center_momentum = unit_interval("DINOLoss center_momentum", center_momentum)
        self.teacher_views = global_views(self.global_crops)
        self.inputs = (*self.teacher_views, *local_views(self.local_crops))
        self.prototypes: nn.Parameter | None = None
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # The teacher scores of this step's forwards, summed (with their row count): the centre's next target.
        self.register_buffer("pending_sum", torch.zeros(1, self.out_dim), persistent=False)
        self.register_buffer("pending_rows", torch.zeros((), dtype=torch.long), persistent=False)
        if dim is not None:
            self._build(positive_int("DINOLoss dim", dim))

    def _build(self, dim: int) -> None:
        weight = torch.empty(self.out_dim, dim)
        nn.init.trunc_normal_(weight, std=0.02)
        self.prototypes = nn.Parameter(weight)
        self.register_buffer("teacher_prototypes", weight.clone())

    def bind(self, spec: ModelSpec) -> None:
        """Build the prototypes for the model's SSL-head width (where no `dim` was given), or check it."""
        dim = spec.head.ssl_embed_dim
        if self.prototypes is None:
            self._build(dim)
        elif self.prototypes.shape[1] != dim:
            raise ValueError(f"DINOLoss was built for {self.prototypes.shape[1]}-d SSL embeddings but the model's "
                             f"SSL head gives {dim}")

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return (f"out_dim={self.out_dim}, global_crops={self.global_crops}, local_crops={self.local_crops}, "
                f"student_temp={self.student_temp}, teacher_temp={self.teacher_temp}, "
                f"center_momentum={self.center_momentum}")

    def current_teacher_temp(self) -> float:
        """The teacher temperature of this step: DINO's linspace(warmup_teacher_temp, teacher_temp, warmup steps)
        at the step, then `teacher_temp`."""
        steps, warmup = int(self.steps), self.warmup_teacher_temp_steps
        if steps >= warmup:
            return self.teacher_temp
        fraction = steps / (warmup - 1) if warmup > 1 else 0.0
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * fraction

    @staticmethod
    def _scores(embeddings: Tensor, prototypes: Tensor) -> Tensor:
        return F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The cross-entropy of every student crop against every other global crop's teacher distribution."""
        if self.prototypes is None:
            raise RuntimeError("DINOLoss has no prototypes yet: pass dim= or call bind(model.spec)")
        students = self._read(outputs, *(f"{view}_embed" for view in self.inputs))
        teachers = self._read(outputs, *(teacher_key(f"{view}_embed") for view in self.teacher_views))
        with torch.autocast(students[0].device.type, enabled=False):
            prototypes = self.prototypes.to(students[0].dtype)
            student_logs = [F.log_softmax(self._scores(s, prototypes) / self.student_temp, dim=-1) for s in students]
            with torch.no_grad():
                teacher_scores = [self._scores(t.detach(), self.teacher_prototypes.to(t.dtype)) for t in teachers]
                center = self.center.to(teacher_scores[0].dtype)
                targets = [F.softmax((t - center) / self.current_teacher_temp(), dim=-1) for t in teacher_scores]
            terms = [-(target * student_logs[v]).sum(dim=-1).mean()
                     for q, target in enumerate(targets) for v in range(len(students)) if v != q]
            loss = torch.stack(terms).mean()
            self._remember_batch_center(torch.cat(teacher_scores))
            entropy = torch.stack([-(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean() for p in targets]).mean()
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("teacher_entropy"): entropy}

    @torch.no_grad()
    def _remember_batch_center(self, teacher_scores: Tensor) -> None:
        everyone, _ = self._gather(teacher_scores)
        self.pending_sum += everyone.sum(dim=0, keepdim=True).to(self.pending_sum.dtype)
        self.pending_rows += everyone.shape[0]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the centre towards the mean teacher score of the step's global batch; count the step."""
        if int(self.pending_rows):
            batch_center = self.pending_sum / self.pending_rows
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
            self.pending_sum.zero_()
            self.pending_rows.zero_()
        self.steps += 1

    @torch.no_grad()
    def after_skipped_step(self) -> None:
        """Forget the teacher scores of a skipped step: the centre moves only with the steps taken."""
        self.pending_sum.zero_()
        self.pending_rows.zero_()

    @torch.no_grad()
    def after_teacher_update(self, momentum: float) -> None:
        """The teacher's prototypes follow the student's with the teacher's momentum."""
        if self.prototypes is not None:
            student = whole_tensor(self.prototypes.detach())  # gathered where FSDP shards it
            self.teacher_prototypes.lerp_(student.to(self.teacher_prototypes.dtype), 1 - momentum)
