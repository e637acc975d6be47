"""Training objectives: CLIP, SimCLR (NT-Xent), SigLIP and weighted sums of them such as SLIP."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slip.distributed import Gather, local_gather
from slip.inputs import ALL_INPUTS, IMAGE_TEXT, SSL_VIEWS
from slip.siglip_exchange import process_group_world, ring_sigmoid_loss


class MissingOutputError(KeyError):
    """An objective was given model outputs that lack a key it reads."""

    def __str__(self) -> str:
        # KeyError's default str() wraps the message in quotes.
        return str(self.args[0])


def _full_precision(tensor: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32; float32 and float64 are kept."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _union_inputs(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Union of input-key tuples, ordered image, text, aug1, aug2, then any others by first appearance."""
    seen = list(dict.fromkeys(key for group in groups for key in group))
    rank = {key: i for i, key in enumerate(ALL_INPUTS)}
    return tuple(sorted(seen, key=lambda key: (rank.get(key, len(rank)), seen.index(key))))


def _top1(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of rows whose arg-max is the label, as a detached float32 scalar."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean() * 100


class Objective(nn.Module):
    """Base class: maps a model's outputs dict to a dict holding `loss` plus named terms and metrics.

    `inputs` names the batch keys it needs. Its result keys other than `loss` start with its `name` (the class's
    `default_name` unless given, e.g. the name of its term in a composed objective): `{name}_loss`, and
    `{name}_{suffix}` for each of `metric_suffixes`, the metrics training shows beside the loss on the console (every
    result key is logged). `after_optimizer_step` is its hook for state kept between steps. `teacher_views` names
    the inputs a momentum teacher (`slip.teacher.MomentumTeacher`) must embed for it; the training task then keeps
    one and adds its outputs, under `slip.teacher.teacher_key` names, to the outputs the objective reads.
    """

    inputs: tuple[str, ...] = ()
    teacher_views: tuple[str, ...] = ()
    default_name: str = "objective"
    metric_suffixes: tuple[str, ...] = ()

    def __init__(self, gather: Gather | None = None, name: str | None = None) -> None:
        super().__init__()
        self._gather: Gather = gather if gather is not None else local_gather
        self.name = self.default_name if name is None else name
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"{type(self).__name__} name must be an identifier, got {self.name!r}")

    @property
    def metrics(self) -> tuple[str, ...]:
        """The result keys shown on the console beside the loss."""
        return tuple(self.key(suffix) for suffix in self.metric_suffixes)

    def key(self, suffix: str) -> str:
        """The result key `{name}_{suffix}`."""
        return f"{self.name}_{suffix}"

    def label(self) -> str:
        """What results and reports call this objective: its class name."""
        return type(self).__name__

    def bind(self, spec: Any) -> None:
        """Build the parts whose sizes follow the model (`spec`: its `slip.models.ModelSpec`), such as a
        predictor over the SSL head; nothing by default. Training calls it before building the optimizer."""

    def after_teacher_update(self, momentum: float) -> None:
        """Called (without autograd) after the momentum teacher's EMA step with `momentum`: the hook for teacher-side
        parts the objective keeps itself (DINO's prototypes); nothing by default."""

    def after_skipped_step(self) -> None:
        """Called after a step the engine skipped (non-finite loss, fp16 overflow): drop what its forwards gathered
        for the step (DINO's centre); nothing by default."""

    def set_gather(self, gather: Gather) -> None:
        """Use `gather` to collect the global batch (e.g. `make_gather(world)` once distributed is up)."""
        self._gather = gather

    def after_optimizer_step(self) -> None:
        """Called (without autograd) after every optimizer step that was taken; nothing by default."""

    def _read(self, outputs: Mapping[str, Tensor], *keys: str) -> list[Tensor]:
        """Fetch `keys` from `outputs`, upcast to at least float32, with a clear error on a missing key."""
        for key in keys:
            if key not in outputs:
                raise MissingOutputError(
                    f"{type(self).__name__} needs outputs[{key!r}], which is missing (got {sorted(outputs)})"
                )
        return [_full_precision(outputs[key]) for key in keys]

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Compute the loss and metrics from the model outputs."""
        raise NotImplementedError


def _both_directions(a: Tensor, all_a: Tensor, b: Tensor, all_b: Tensor,
                     score: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Logits of a's local rows against all of b, and of b's local rows against all of a.

    With the whole batch local (one process: the gathered batch is the local one) the second is the first's
    transpose, one matrix product fewer."""
    a_to_b = score(a, all_b)
    return a_to_b, a_to_b.T if all_a.shape[0] == a.shape[0] else score(b, all_a)


def _check_pair(objective: Objective, a_key: str, a: Tensor, b_key: str, b: Tensor) -> None:
    """Raise if two paired embedding batches differ in shape."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{type(objective).__name__} needs 2-D {a_key} and {b_key} of equal shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _unit_image_text(objective: Objective, outputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The image and text embeddings of `outputs`, checked as a pair and L2-normalised in float32, and the
    logit scale."""
    image, text, scale = objective._read(outputs, "image_embed", "text_embed", "logit_scale")
    _check_pair(objective, "image_embed", image, "text_embed", text)
    with torch.autocast(image.device.type, enabled=False):
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale


class CLIPLoss(Objective):
    """Symmetric InfoNCE between image and text embeddings (Radford et al. 2021)."""

    inputs = IMAGE_TEXT
    default_name = "clip"
    metric_suffixes = ("acc",)

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean of the image->text and text->image cross-entropies over the global batch."""
        image, text, scale = _unit_image_text(self, outputs)
        with torch.autocast(image.device.type, enabled=False):
            all_image, offset = self._gather(image)
            all_text, _ = self._gather(text)
            labels = offset + torch.arange(image.shape[0], device=image.device)
            logits_per_image, logits_per_text = _both_directions(image, all_image, text, all_text,
                                                                 lambda rows, columns: scale * rows @ columns.T)
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("acc"): _top1(logits_per_image, labels)}


class SimCLRLoss(Objective):
    """NT-Xent between two augmented views (Chen et al. 2020), with each row's own view-mate excluded."""

    inputs = SSL_VIEWS
    default_name = "ssl"
    metric_suffixes = ("acc",)

    def __init__(self, temperature: float = 0.1, gather: Gather | None = None, name: str | None = None) -> None:
        super().__init__(gather, name)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"SimCLRLoss temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"temperature={self.temperature}"

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over both views of the cross-entropy against 2N-1 candidates (N = global batch)."""
        q_a, q_b = self._read(outputs, "aug1_embed", "aug2_embed")
        _check_pair(self, "aug1_embed", q_a, "aug2_embed", q_b)
        with torch.autocast(q_a.device.type, enabled=False):
            q_a, q_b = F.normalize(q_a, dim=-1), F.normalize(q_b, dim=-1)
            k_a, offset = self._gather(q_a)
            k_b, _ = self._gather(q_b)
            labels = offset + torch.arange(q_a.shape[0], device=q_a.device)
            # A row's similarity to itself is not a candidate; its column index equals its label.
            is_self = labels[:, None] == torch.arange(k_a.shape[0], device=q_a.device)
            logits_aa = (q_a @ k_a.T / self.temperature).masked_fill(is_self, float("-inf"))
            logits_bb = (q_b @ k_b.T / self.temperature).masked_fill(is_self, float("-inf"))
            logits_ab, logits_ba = _both_directions(q_a, k_a, q_b, k_b,
                                                    lambda rows, columns: rows @ columns.T / self.temperature)
            logits_a = torch.cat([logits_ab, logits_aa], dim=1)
            logits_b = torch.cat([logits_ba, logits_bb], dim=1)
            loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("acc"): _top1(logits_a, labels)}


class SigLIPLoss(Objective):
    """Pairwise sigmoid loss between image and text embeddings (Zhai et al. 2023), with a learnable bias.

    Its result holds `logit_bias`, the bias this forward used (a detached copy, so a later optimizer step does not
    change it), which training logs beside the logit scale.

    `exchange` says how a rank meets the other ranks' texts: "gather" all-gathers them (the gather function's
    global batch) and scores them at once; "bidirectional" passes them between neighbours of torch.distributed's
    default group, one rank's chunk at a time (`slip.siglip_exchange`), so no rank holds the logits against the
    whole global batch. Both give the same loss and gradients. "bidirectional" exchanges only when the gather is a
    global one (not `local_gather`) and that group has several ranks; otherwise it computes as "gather" does.
    """

    inputs = IMAGE_TEXT
    default_name = "siglip"
    metric_suffixes = ("acc",)
    exchanges = ("gather", "bidirectional")

    def __init__(self, init_logit_bias: float = -10.0, exchange: str = "gather", gather: Gather | None = None,
                 name: str | None = None) -> None:
        super().__init__(gather, name)
        if exchange not in self.exchanges:
            raise ValueError(f"SigLIPLoss exchange must be one of {', '.join(self.exchanges)}, got {exchange!r}")
        self.exchange = exchange
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum over local images and global texts of -log sigmoid(+-logit), divided by the local batch."""
        image, text, scale = _unit_image_text(self, outputs)
        world = None if self.exchange == "gather" or self._gather is local_gather else process_group_world()
        with torch.autocast(image.device.type, enabled=False):
            bias = _full_precision(self.logit_bias)
            if world is None:
                all_text, offset = self._gather(text)
                labels = offset + torch.arange(image.shape[0], device=image.device)
                logits = scale * image @ all_text.T + bias
                is_match = labels[:, None] == torch.arange(all_text.shape[0], device=image.device)
                signs = is_match.to(logits.dtype) * 2 - 1
                loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
                acc = _top1(logits, labels)
            else:
                rank, world_size = world
                loss, predicted = ring_sigmoid_loss(image, text, scale, bias, rank, world_size)
                loss = loss / image.shape[0]
                labels = rank * image.shape[0] + torch.arange(image.shape[0], device=image.device)
                acc = (predicted == labels).float().mean() * 100
        return {"loss": loss, self.key("loss"): loss.detach(), self.key("acc"): acc,
                "logit_bias": bias.detach().clone()}


@dataclass(frozen=True)
class Term:
    """One term of a `ComposedObjective`: an objective and its weight in the sum."""

    objective: Objective
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise ValueError(f"a term's objective must be an Objective, got {type(self.objective).__name__}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"a term's weight must be a finite number, got {self.weight!r}")


class ComposedObjective(Objective):
    """A weighted sum of named terms: it needs the union of their inputs, and each term, renamed to its key,
    reports its loss and metrics under that name (so one kind of objective can be a term twice).

    `terms` maps names to `Term`s, or to mappings {"objective": ..., "weight": ...} as a config writes them.
    """

    def __init__(self, terms: Mapping[str, Term | Mapping[str, Any]], gather: Gather | None = None,
                 name: str | None = None) -> None:
        super().__init__(gather, name)
        if not terms:
            raise ValueError("ComposedObjective needs at least one term")
        built = {key: _as_term(key, term) for key, term in terms.items()}
        for key, term in built.items():
            term.objective.name = key
        self.objectives = nn.ModuleDict({key: term.objective for key, term in built.items()})
        self.weights = {key: float(term.weight) for key, term in built.items()}
        self.inputs = _union_inputs(child.inputs for child in self.objectives.values())
        self.teacher_views = _union_inputs(child.teacher_views for child in self.objectives.values())
        # With gather=None the terms keep whatever gather they were built with (local by default).
        if gather is not None:
            self.set_gather(gather)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every term's console metrics, in order."""
        return tuple(dict.fromkeys(key for child in self.objectives.values() for key in child.metrics))

    def label(self) -> str:
        """The terms' names joined by "+", e.g. "clip+ssl"."""
        return "+".join(self.objectives)

    def bind(self, spec: Any) -> None:
        """Every term's `bind`."""
        for child in self.objectives.values():
            child.bind(spec)

    def after_teacher_update(self, momentum: float) -> None:
        """Every term's `after_teacher_update`."""
        for child in self.objectives.values():
            child.after_teacher_update(momentum)

    def after_skipped_step(self) -> None:
        """Every term's `after_skipped_step`."""
        for child in self.objectives.values():
            child.after_skipped_step()

    def set_gather(self, gather: Gather) -> None:
        """Use `gather` here and in every term."""
        super().set_gather(gather)
        for child in self.objectives.values():
            child.set_gather(gather)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"weights={self.weights}"

    def after_optimizer_step(self) -> None:
        """Every term's hook, in order."""
        for child in self.objectives.values():
            child.after_optimizer_step()

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """loss = sum of weight * term loss, plus every term's results."""
        result: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, child in self.objectives.items():
            child_result = child(outputs)
            term = self.weights[name] * child_result["loss"]
            total = term if total is None else total + term
            for key, value in child_result.items():
                if key == "loss":
                    continue
                if key in result:
                    raise ValueError(f"ComposedObjective: term {name!r} returns {key!r}, already set by another")
                result[key] = value
        assert total is not None  # guaranteed by the non-empty check in __init__
        return {"loss": total, **result}


def _as_term(key: str, term: Term | Mapping[str, Any]) -> Term:
    """`term` as a Term; a one-line ValueError naming `key` for anything else."""
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"ComposedObjective term names must be identifiers, got {key!r}")
    if isinstance(term, Term):
        return term
    if not isinstance(term, Mapping) or "objective" not in term or set(term) - {"objective", "weight"}:
        raise ValueError(f"term {key!r} must be a Term or a mapping with 'objective' and optionally 'weight', "
                         f"got {term!r}")
    try:
        return Term(**term)
    except ValueError as error:
        raise ValueError(f"term {key!r}: {error}") from None


class SLIPLoss(ComposedObjective):
    """SLIP (Mu et al. 2021): CLIP loss + ssl_scale * SimCLR loss."""

    def __init__(self, ssl_scale: float = 1.0, ssl_temperature: float = 0.1, gather: Gather | None = None) -> None:
        if not (math.isfinite(ssl_scale) and ssl_scale >= 0):
            raise ValueError(f"SLIPLoss ssl_scale must be a finite number >= 0, got {ssl_scale}")
        super().__init__({"clip": Term(CLIPLoss(), 1.0), "ssl": Term(SimCLRLoss(ssl_temperature), ssl_scale)}, gather)

    def label(self) -> str:
        """Its class name: SLIP is one named objective, not a composition a user wrote."""
        return type(self).__name__
