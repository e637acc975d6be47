"""Exact gradient accumulation: the objective once over every micro-batch, the towers replayed one at a time.

A contrastive objective compares every sample of the batch with every other one, so summing the gradients of
k small batches (`independent` accumulation) optimises a different, small-batch objective. `exact_backward`
gives the gradients of one step on the whole accumulated batch while holding the activations of one
micro-batch at a time:

1. every micro-batch goes through the towers (`encode`) without autograd, except the first, whose graph is
   kept; their features are cached (k·b rows of a few hundred numbers);
2. the heads and the objective (`finish`) run once, with autograd, on the concatenated features: the heads'
   and objective's parameters get their gradients, and so do the cached features;
3. the first micro-batch back-propagates its slice of those feature gradients through the graph it kept; every
   other micro-batch is encoded again, with autograd, and back-propagates its slice.

Step 3 replays each micro-batch with the random state it had in step 1 (drop-path and dropout draw the same
masks), and modules that update buffers while training (BatchNorm's running statistics) update them once per
micro-batch, in order, as the single-graph computation does. Gradient checkpointing keeps that count: its
recomputation in backward (of the kept graph and of each replay) updates no buffers
(`slip.models.vision.checkpoint_keeping_buffers`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from slip.models.vision import scratch_buffers
from slip.random_state import RandomState

Encode = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
"""A micro-batch -> the features the rest of the step needs (the towers' part of the model)."""
Finish = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""Features of the whole accumulated batch -> the objective's result dict, holding `loss`."""
ACCUMULATION_MODES = ("exact", "independent")


def _capture(device: torch.device) -> RandomState:
    """The state of the generators that a forward pass on `device` draws from: the CPU's, and the device's."""
    return RandomState.capture(python=False, cuda=[device] if device.type == "cuda" else [])


def _rows(features: Mapping[str, Tensor]) -> int:
    sizes = {value.shape[0] for value in features.values()}
    if len(sizes) != 1:
        raise ValueError(f"micro-batch features differ in rows: { {k: v.shape[0] for k, v in features.items()} }")
    return sizes.pop()


def _backward_slice(features: Mapping[str, Tensor], gradients: Mapping[str, Tensor | None]) -> None:
    """Back-propagate `gradients` (a slice of the cached features' gradients) from `features`."""
    pairs = [(features[key], grad) for key, grad in gradients.items() if grad is not None]
    if pairs:
        outputs, grads = zip(*pairs)
        torch.autograd.backward(list(outputs), list(grads))


def exact_backward(
    micro_batches: Sequence[Mapping[str, Tensor]],
    encode: Encode,
    finish: Finish,
    backward: Callable[[Tensor], None],
    stateful: nn.Module,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    replay: Encode | None = None,
    sync: Callable[[bool], None] | None = None,
) -> dict[str, Tensor]:
    """Accumulate into `.grad` the gradients of `finish` over all of `micro_batches`; return its result.

    `backward(loss)` starts the backward pass (e.g. through a gradient scaler), `stateful` is the module whose
    buffers `encode` may update (they change once per micro-batch, as without caching), `autocast()` wraps
    every forward computation. `replay` (default `encode`) encodes the micro-batches again in step 3: the same
    features, without any work that step 1 did for `finish` alone (e.g. a teacher's outputs, taken once).
    `sync(flag)`, where given, is called before each backward pass: True for the objective's and the last
    micro-batch's, False for the others (FSDP2's `set_requires_gradient_sync`: every unit's gradients are reduced
    once, in the last pass that reaches it). Otherwise the caller reduces the gradients across processes.
    """
    sync = sync or (lambda flag: None)
    if not micro_batches:
        raise ValueError("exact_backward needs at least one micro-batch")
    states, cached = [], []
    with autocast():
        states.append(_capture(device))
        kept = encode(micro_batches[0])
        cached.append({key: value.detach() for key, value in kept.items()})
        # The replays below make each later micro-batch's buffer update, once and in order.
        with torch.no_grad(), scratch_buffers(stateful):
            for batch in micro_batches[1:]:
                states.append(_capture(device))
                cached.append(encode(batch))
    rows = [_rows(features) for features in cached]
    whole = {key: torch.cat([features[key] for features in cached]).requires_grad_() for key in cached[0]}
    del cached
    with autocast():
        result = finish(whole)
    sync(True)
    backward(result["loss"])
    after = _capture(device)
    replay = encode if replay is None else replay
    slices = {key: (leaf.grad.split(rows) if leaf.grad is not None else [None] * len(rows))
              for key, leaf in whole.items()}
    sync(len(micro_batches) == 1)
    _backward_slice(kept, {key: parts[0] for key, parts in slices.items()})
    del kept
    for index in range(1, len(micro_batches)):
        sync(index == len(micro_batches) - 1)
        states[index].restore()
        with autocast():
            replayed = replay(micro_batches[index])
        _backward_slice(replayed, {key: parts[index] for key, parts in slices.items()})
    after.restore()
    return result
