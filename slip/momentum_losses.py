"""Objectives that learn from a momentum teacher (`slip.teacher.MomentumTeacher`): BYOL and MoCo v3.

Both read the student's SSL-head outputs of the two views (`aug1_embed`, `aug2_embed`) and the teacher's of the same
views (`teacher_aug1_embed`, `teacher_aug2_embed`), and both pass the student's through a predictor MLP of their own
(Linear-BN-ReLU-Linear, as in both papers; without biases for MoCo v3, as in its code), whose size follows the
model's SSL head: `bind(spec)` builds it where it was not given a `dim`. The predictor's BatchNorm sees the global
batch (exact accumulation runs the objective once on it; across processes it becomes a SyncBatchNorm1d, as the SSL
head's does).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slip.checks import positive_int, positive_number
from slip.distributed import Gather
from slip.inputs import SSL_VIEWS
from slip.losses import Objective, _check_pair, _top1
from slip.teacher import teacher_key

if TYPE_CHECKING:
    from slip.models.spec import ModelSpec

__all__ = ["BYOLLoss", "MoCoV3Loss", "predictor"]


def predictor(dim: int, hidden_dim: int, bias: bool = True) -> nn.Sequential:
    """BYOL's and MoCo v3's predictor: Linear(dim, hidden)-BN-ReLU-Linear(hidden, dim), with or without the linear
    layers' biases (BYOL's have them, MoCo v3's code has none)."""
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(dim, hidden_dim, bias=bias)),
        ("bn1", nn.BatchNorm1d(hidden_dim)),
        ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(hidden_dim, dim, bias=bias)),
    ]))


class _MomentumObjective(Objective):
    """Base: a predictor over the SSL head's outputs, and the student's and teacher's embeddings of both views."""

    inputs = SSL_VIEWS
    teacher_views = SSL_VIEWS
    predictor_bias = True

    def __init__(self, hidden_dim: int, dim: int | None, gather: Gather | None, name: str | None) -> None:
        super().__init__(gather, name)
        self.hidden_dim = positive_int(f"{type(self).__name__} hidden_dim", hidden_dim)
        self.predictor: nn.Sequential | None = None
        if dim is not None:
            self.predictor = predictor(positive_int(f"{type(self).__name__} dim", dim), hidden_dim, self.predictor_bias)

    def bind(self, spec: ModelSpec) -> None:
        """Build the predictor for the model's SSL-head width (where no `dim` was given), or check it."""
        dim = spec.head.ssl_embed_dim
        if self.predictor is None:
            self.predictor = predictor(dim, self.hidden_dim, self.predictor_bias)
        elif self.predictor.layer1.in_features != dim:
            raise ValueError(f"{type(self).__name__} was built for {self.predictor.layer1.in_features}-d SSL "
                             f"embeddings but the model's SSL head gives {dim}")

    def _views(self, outputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """([prediction of view 1, of view 2], [teacher embedding of view 1, of view 2]) in at least float32."""
        if self.predictor is None:
            raise RuntimeError(f"{type(self).__name__} has no predictor yet: pass dim= or call bind(model.spec)")
        students = self._read(outputs, *(f"{view}_embed" for view in SSL_VIEWS))
        teachers = self._read(outputs, *(teacher_key(f"{view}_embed") for view in SSL_VIEWS))
        _check_pair(self, "aug1_embed", students[0], "aug2_embed", students[1])
        for view, student, teacher in zip(SSL_VIEWS, students, teachers):
            _check_pair(self, f"{view}_embed", student, teacher_key(f"{view}_embed"), teacher)
        # One predictor pass per view, as in both papers: its BatchNorm normalises each view with its own statistics.
        return [_at_least_float32(self.predictor(s)) for s in students], [t.detach() for t in teachers]


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class BYOLLoss(_MomentumObjective):
    """BYOL (Grill et al. 2020): each view's prediction regresses the teacher's embedding of the other view.

    loss = mean over the batch of (2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1')), the paper's symmetrised L + L~.
    """

    default_name = "byol"
    metric_suffixes = ("cosine",)

    def __init__(self, hidden_dim: int = 4096, dim: int | None = None, gather: Gather | None = None,
                 name: str | None = None) -> None:
        super().__init__(hidden_dim, dim, gather, name)

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The symmetrised regression loss, and the mean cosine between predictions and targets."""
        (p1, p2), (z1, z2) = self._views(outputs)
        with torch.autocast(p1.device.type, enabled=False):
            cosines = torch.cat([F.cosine_similarity(p1, z2, dim=-1), F.cosine_similarity(p2, z1, dim=-1)])
            loss = 2 * (2 - 2 * cosines.mean())
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("cosine"): cosines.detach().mean()}


class MoCoV3Loss(_MomentumObjective):
    """MoCo v3 (Chen, Xie and He 2021): InfoNCE of each view's prediction against the teacher's embeddings of the
    other view over the global batch, symmetrised and scaled by 2 temperature as in the paper's code.

    loss = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = 2 T CE(q k_all^T / T, own index).
    """

    default_name = "mocov3"
    metric_suffixes = ("acc",)
    predictor_bias = False

    def __init__(self, temperature: float = 0.2, hidden_dim: int = 4096, dim: int | None = None,
                 gather: Gather | None = None, name: str | None = None) -> None:
        super().__init__(hidden_dim, dim, gather, name)
        self.temperature = positive_number("MoCoV3Loss temperature", temperature)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"temperature={self.temperature}"

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The symmetrised contrastive loss, and the top-1 accuracy of view 1's predictions."""
        (q1, q2), (k1, k2) = self._views(outputs)
        with torch.autocast(q1.device.type, enabled=False):
            q1, q2, k1, k2 = (F.normalize(t, dim=-1) for t in (q1, q2, k1, k2))
            all_k1, offset = self._gather(k1)
            all_k2, _ = self._gather(k2)
            labels = offset + torch.arange(q1.shape[0], device=q1.device)
            logits_12 = q1 @ all_k2.T / self.temperature
            logits_21 = q2 @ all_k1.T / self.temperature
            scale = 2 * self.temperature
            loss = scale * (F.cross_entropy(logits_12, labels) + F.cross_entropy(logits_21, labels))
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("acc"): _top1(logits_12, labels)}
