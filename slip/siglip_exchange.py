"""SigLIP's loss over ranks by passing text embeddings between neighbours (open_clip's "bidirectional" schedule).

Each rank scores its local images against its own texts (the matching pairs lie on that block's diagonal), then
against the texts of every other rank, one rank's chunk at a time: in each round it sends to its left neighbour
the chunk it last got from its right, and to its right neighbour the chunk it last got from its left, so after
round i it holds the chunks of ranks rank - i and rank + i; with an even number of ranks one final one-way round
brings the chunk of the rank opposite. The loss is the gathered one (`SigLIPLoss(exchange="gather")`), summed
block by block: no rank holds the logits against the whole global batch, and each block's logits are recomputed
in backward rather than kept. The backward of an exchange sends the received chunks' gradients back the other way,
so every rank's text rows get the gradient of every rank's loss, as the all-gather's backward gives them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def process_group_world() -> tuple[int, int] | None:
    """(rank, world size) of torch.distributed's default group when it is up with several ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _check_equal_shapes(tensor: Tensor) -> None:
    """Raise on every rank unless every rank's `tensor` has this shape (the exchanges send equal chunks)."""
    shape = torch.tensor([*tensor.shape, *(-size for size in tensor.shape)], device=tensor.device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    largest, smallest = shape[: tensor.ndim].tolist(), [-size for size in shape[tensor.ndim :].tolist()]
    if largest != smallest:
        raise ValueError(f"the bidirectional SigLIP exchange needs equal text batches on every rank, "
                         f"got shapes from {tuple(smallest)} to {tuple(largest)}")


def _send_receive(sends: list[tuple[Tensor, int]], sources: list[int], like: Tensor) -> list[Tensor]:
    """Send each tensor to its peer and receive one tensor shaped like `like` from each of `sources`."""
    received = [torch.empty(like.shape, dtype=like.dtype, device=like.device) for _ in sources]
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer) for tensor, peer in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer) for buffer, peer in zip(received, sources)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _PassRight(torch.autograd.Function):
    """Send to the right neighbour, receive from the left; the gradient goes the other way."""

    @staticmethod
    def forward(ctx, tensor: Tensor, left: int, right: int) -> Tensor:  # type: ignore[override]
        ctx.left, ctx.right = left, right
        return _send_receive([(tensor, right)], [left], tensor)[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _send_receive([(grad, ctx.left)], [ctx.right], grad)[0], None, None


class _PassBothWays(torch.autograd.Function):
    """Send `to_left` left and `to_right` right; return (from the right, from the left). The gradient of what came
    from a side goes back to that side."""

    @staticmethod
    def forward(ctx, to_left: Tensor, to_right: Tensor,  # type: ignore[override]
                left: int, right: int) -> tuple[Tensor, Tensor]:
        ctx.left, ctx.right = left, right
        from_right, from_left = _send_receive([(to_left, left), (to_right, right)], [right, left], to_left)
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: Tensor, grad_from_left: Tensor):  # type: ignore[override]
        grad_to_left, grad_to_right = _send_receive([(grad_from_right, ctx.right), (grad_from_left, ctx.left)],
                                                    [ctx.left, ctx.right], grad_from_right)
        return grad_to_left, grad_to_right, None, None


def _signs(logits: Tensor, matched: bool) -> Tensor | float:
    """+1 for the matching pairs (the diagonal of the rank's own block), -1 for the others."""
    if not matched:
        return -1.0
    return torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device) * 2 - 1


class _BlockLoss(torch.autograd.Function):
    """Sum of -log sigmoid(sign * (scale * image @ text.T + bias)) over one block, and each row's largest logit and
    its column (no gradient). Only the inputs are kept for backward, which recomputes the block's logits."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,  # type: ignore[override]
                matched: bool) -> tuple[Tensor, Tensor, Tensor]:
        logits = scale * image @ text.T + bias
        loss = -F.logsigmoid(_signs(logits, matched) * logits).sum()
        best, column = logits.max(dim=1)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.matched = matched
        ctx.mark_non_differentiable(best, column)
        return loss, best, column

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _best: Tensor, _column: Tensor):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        with torch.autocast(image.device.type, enabled=False):
            scaled = scale * image
            logits = scaled @ text.T + bias
            signs = _signs(logits, ctx.matched)
            # d/dz of -log sigmoid(s z) is -s sigmoid(-s z).
            grad_logits = -grad_loss * signs * torch.sigmoid(-signs * logits)
            grad_scaled = grad_logits @ text
            grads = (grad_scaled * scale, grad_logits.T @ scaled, (grad_scaled * image).sum_to_size(scale.shape),
                     grad_logits.sum_to_size(bias.shape))
        return (*(g.to(x.dtype) if need else None
                  for g, x, need in zip(grads, (image, text, scale, bias), ctx.needs_input_grad)), None)


def ring_sigmoid_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, rank: int,
                      world_size: int) -> tuple[Tensor, Tensor]:
    """This rank's local images against every rank's texts, over torch.distributed's default group: the summed
    -log sigmoid loss, and each image's best-scoring text as a global row index (first of ties, as argmax)."""
    _check_equal_shapes(text)
    rows = text.shape[0]
    left, right = (rank - 1) % world_size, (rank + 1) % world_size
    loss, best, column = _BlockLoss.apply(image, text, scale, bias, True)
    predicted = column + rank * rows

    def add(chunk: Tensor, origin: int) -> None:
        nonlocal loss, best, predicted
        block_loss, block_best, block_column = _BlockLoss.apply(image, chunk, scale, bias, False)
        block_predicted = block_column + origin * rows
        better = (block_best > best) | ((block_best == best) & (block_predicted < predicted))
        loss = loss + block_loss
        best, predicted = torch.where(better, block_best, best), torch.where(better, block_predicted, predicted)

    to_left = to_right = text
    rounds, one_way = divmod(world_size - 1, 2)
    for distance in range(1, rounds + 1):
        to_left, to_right = _PassBothWays.apply(to_left, to_right, left, right)  # from the right, from the left
        add(to_left, (rank + distance) % world_size)
        add(to_right, (rank - distance) % world_size)
    if one_way:
        add(_PassRight.apply(to_right, left, right), (rank - rounds - 1) % world_size)
    return loss, predicted
