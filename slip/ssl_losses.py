"""Redundancy-reduction objectives between two augmented views: VICReg and Barlow Twins.

Every batch statistic is taken over the global batch (the gathered views), so that k ranks give the loss of one
process on the concatenated batch; every rank computes that same loss, and the gather's backward sums the ranks'
gradients, so averaging gradients over ranks (as DDP does) gives the one-process gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from slip.distributed import Gather
from slip.inputs import SSL_VIEWS
from slip.losses import Objective, _check_pair

__all__ = ["BarlowTwinsLoss", "VICRegLoss"]


def _checked(owner: Objective, name: str, value: float, low: float, strict: bool) -> float:
    """`value` as a float, or a one-line ValueError naming `name` unless finite and > `low` (>= if not strict)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number > low if strict else number >= low)):
        raise ValueError(f"{type(owner).__name__} {name} must be a finite number {'>' if strict else '>='} {low:g}, "
                         f"got {value!r}")
    return number


def _off_diagonal(matrix: Tensor) -> Tensor:
    """The off-diagonal entries of a square [d, d] matrix, as a [d - 1, d] view."""
    d = matrix.shape[0]
    return matrix.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


class _TwoViewStatistics(Objective):
    """Base: reads both views, gathers the global batch and hands it to `_terms` in at least float32."""

    inputs = SSL_VIEWS

    def _terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and its named terms from the global batch of both views."""
        raise NotImplementedError

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """`loss`, `{name}_loss` and every term under `{name}_{term}`, detached."""
        a, b = self._read(outputs, "aug1_embed", "aug2_embed")
        _check_pair(self, "aug1_embed", a, "aug2_embed", b)
        with torch.autocast(a.device.type, enabled=False):
            z_a, _ = self._gather(a)
            z_b, _ = self._gather(b)
            if z_a.shape[0] < 2:
                raise ValueError(f"{type(self).__name__} needs a global batch of at least 2 rows for its batch "
                                 f"statistics, got {z_a.shape[0]}")
            loss, terms = self._terms(z_a, z_b)
        return {"loss": loss, self.key("loss"): loss.detach(),
                **{self.key(term): value.detach() for term, value in terms.items()}}


class VICRegLoss(_TwoViewStatistics):
    """VICReg (Bardes et al. 2022): invariance + variance + covariance regularisation of two views' embeddings.

    loss = sim_coeff * s(Z, Z') + var_coeff * [v(Z) + v(Z')] + cov_coeff * [c(Z) + c(Z')], the paper's eq. (6) and
    Algorithm 1: s is the mean squared error, v(Z) = mean_j relu(std_target - sqrt(Var(z_j) + eps)) with the
    unbiased variance, c(Z) = sum of the squared off-diagonal entries of the covariance (divided by N - 1) over D.
    The authors' code (and lightly) halve the variance term, [v(Z) + v(Z')] / 2: their std_coeff 25 is var_coeff=12.5
    here.
    """

    default_name = "vicreg"
    metric_suffixes = ("invariance", "variance")

    def __init__(self, sim_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
                 std_target: float = 1.0, gather: Gather | None = None, name: str | None = None) -> None:
        super().__init__(gather, name)
        self.sim_coeff = _checked(self, "sim_coeff", sim_coeff, 0.0, strict=False)
        self.var_coeff = _checked(self, "var_coeff", var_coeff, 0.0, strict=False)
        self.cov_coeff = _checked(self, "cov_coeff", cov_coeff, 0.0, strict=False)
        self.eps = _checked(self, "eps", eps, 0.0, strict=True)
        self.std_target = _checked(self, "std_target", std_target, 0.0, strict=True)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return (f"sim_coeff={self.sim_coeff}, var_coeff={self.var_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, std_target={self.std_target}")

    def _variance(self, z: Tensor) -> Tensor:
        """Mean over dimensions of the hinge on the regularised standard deviation."""
        return F.relu(self.std_target - torch.sqrt(z.var(dim=0) + self.eps)).mean()

    @staticmethod
    def _covariance(z: Tensor) -> Tensor:
        """Sum of the squared off-diagonal covariances, over the dimension."""
        n, d = z.shape
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (n - 1)
        return _off_diagonal(cov).pow(2).sum() / d

    def _terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the three terms, and each term."""
        invariance = F.mse_loss(z_a, z_b)
        variance = self._variance(z_a) + self._variance(z_b)
        covariance = self._covariance(z_a) + self._covariance(z_b)
        loss = self.sim_coeff * invariance + self.var_coeff * variance + self.cov_coeff * covariance
        return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}


class BarlowTwinsLoss(_TwoViewStatistics):
    """Barlow Twins (Zbontar et al. 2021): drive the views' cross-correlation matrix C towards the identity.

    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C the cross-correlation of the paper's eq. (1):
    each dimension centred over the batch and divided by sqrt(biased variance + eps), C = A^T B / N. This is the
    authors' code (BatchNorm1d without affine, eps 1e-5) and lightly; eps keeps constant dimensions finite. The
    paper's Algorithm 1 divides by the unbiased std instead, which scales C by (N - 1) / N, so that identical
    views cannot reach C_ii = 1. lambd defaults to 0.0051, the authors' code; the paper's text rounds it to 5e-3.
    """

    default_name = "barlow"
    metric_suffixes = ("on_diagonal", "off_diagonal")

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5, gather: Gather | None = None,
                 name: str | None = None) -> None:
        super().__init__(gather, name)
        self.lambd = _checked(self, "lambd", lambd, 0.0, strict=False)
        self.eps = _checked(self, "eps", eps, 0.0, strict=True)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"lambd={self.lambd}, eps={self.eps}"

    def _standardise(self, z: Tensor) -> Tensor:
        """Each dimension centred and divided by sqrt(biased variance + eps)."""
        centred = z - z.mean(dim=0)
        return centred * torch.rsqrt(centred.pow(2).mean(dim=0) + self.eps)

    def _terms(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """on_diagonal + lambd * off_diagonal of the cross-correlation, and both terms."""
        c = self._standardise(z_a).T @ self._standardise(z_b) / z_a.shape[0]
        on_diagonal = (c.diagonal() - 1).pow(2).sum()
        off_diagonal = _off_diagonal(c).pow(2).sum()
        return on_diagonal + self.lambd * off_diagonal, {"on_diagonal": on_diagonal, "off_diagonal": off_diagonal}
