"""The full-softmax loss without its (positions, items) matrix: a chunked linear + cross-entropy.

`linear_cross_entropy(hidden, table, targets)` is `F.cross_entropy(hidden @ table.T, targets, reduction="sum")`
in value and in gradients (rows whose target is recblr.data.NO_TARGET, its default ignore_index, count for
nothing), but the logits only ever exist a chunk of rows at a time. The forward computes each chunk's loss
and, right away, its gradients (the fused linear cross-entropy of Liger-Kernel and of Apple's cut
cross-entropy); the backward only scales them by the scalar upstream gradient. What autograd keeps is
grad_hidden (n, D) and grad_table (V, D) instead of the logits' log-softmax (n, V), and the backward makes no
(n, V) gradient: at 12,800 positions x 100k items each of those is 5 GB.

Per row, with logits z, eps the label smoothing and PyTorch's definition of it (a (1 - eps) weight on the
target, eps spread evenly over all V classes, padding included):
    loss = lse(z) - (1 - eps) z_target - eps mean(z)      dloss/dz = softmax(z) - (1 - eps) onehot - eps / V

Precision is the plain path's under bf16 autocast (scores matmul in bf16, `.float()` on the logits): the
matmuls take their inputs in the autocast dtype, softmax and sums run in float32 (float64 for float64 inputs),
and the gradients come back in the dtypes of hidden and table. The casts are explicit and autocast is off
inside, so what runs in which dtype does not depend on autocast's op lists (torch.amp.custom_fwd would do the
same but for one device type fixed at decoration; the backward only scales, so it needs no autocast state).
"""
from __future__ import annotations

from typing import Optional

import torch

from recblr.data import NO_TARGET
from recblr.evaluate import SCORE_BUDGET


def _chunked(hidden, table, targets, label_smoothing: float, chunk_size: int, dtype: torch.dtype,
             grad_hidden_needed: bool, grad_table_needed: bool):
    """(loss, grad_hidden or None, grad_table or None), the gradients those of the summed loss."""
    n, V = hidden.shape[0], table.shape[0]
    acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: float32 at least
    weights = table.to(dtype)  # (V, D): cast once, not per chunk
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None  # (n, D): every row is written
    grad_table = torch.zeros(table.shape, dtype=acc, device=table.device) if grad_table_needed else None  # (V, D)
    for lo in range(0, n, chunk_size):
        rows, target = hidden[lo:lo + chunk_size].to(dtype), targets[lo:lo + chunk_size, None]  # (c, D), (c, 1)
        keep = (target != NO_TARGET).to(acc)  # (c, 1): 0 drops a row from the loss and from both gradients
        target = target.clamp(min=0)
        block = (rows @ weights.T).to(acc)  # (c, V): the chunk's logits
        per_row = -(1 - label_smoothing) * block.gather(1, target)  # (c, 1)
        if label_smoothing:
            per_row -= label_smoothing * block.mean(1, keepdim=True)
        # log-sum-exp, then the softmax, in place: no second (c, V) block (but a bf16 copy under autocast)
        top = block.amax(1, keepdim=True)  # (c, 1)
        total = block.sub_(top).exp_().sum(1, keepdim=True)  # (c, 1)
        loss += ((per_row + top + total.log()) * keep).sum()
        if grad_hidden_needed or grad_table_needed:
            block.div_(total)  # dloss/dlogits = softmax - (1 - eps) onehot - eps / V
            block.scatter_add_(1, target, torch.full_like(target, label_smoothing - 1, dtype=acc))
            if label_smoothing:
                block.sub_(label_smoothing / V)
            block = block.to(dtype)  # the matmuls' dtype, as the plain path's backward under autocast
            if grad_hidden_needed:  # the dropped rows' zeros applied to (c, D), not to the (c, V) block
                grad_hidden[lo:lo + chunk_size] = (block @ weights) * keep.to(dtype)  # (c, D)
            if grad_table_needed:
                grad_table += block.T @ (rows * keep.to(dtype))  # (V, D), summed over chunks in `acc`
        del block  # freed before the next chunk's is made, not after: one block alive at a time
    return loss, grad_hidden, None if grad_table is None else grad_table.to(table.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, targets, label_smoothing, chunk_size, dtype):
        loss, grad_hidden, grad_table = _chunked(hidden, table, targets, label_smoothing, chunk_size, dtype,
                                                 *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_table)  # what the backward needs, and all it keeps
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_table = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_table is None else grad_table * grad_loss.to(grad_table.dtype), None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                         label_smoothing: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ table.T, targets, label_smoothing=..., reduction="sum"), holding at most
    chunk_size rows of logits (default: as many as keep chunk x V under SCORE_BUDGET).

    hidden (n, D), table (V, D), targets (n,) integers in [0, V), or NO_TARGET for a row that counts for nothing.
    Under autocast the matmuls run in its dtype; outside it hidden and table must share a dtype. Targets are
    range-checked on the CPU only: on a GPU the check would wait for the device.
    """
    if hidden.dim() != 2 or table.dim() != 2 or hidden.shape[1] != table.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (n, D) and table (V, D) must share D, got "
                         f"{tuple(hidden.shape)} and {tuple(table.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integers of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if targets.device.type == "cpu" and len(targets):
        kept = targets[targets != NO_TARGET]
        low, high = (int(kept.min()), int(kept.max())) if len(kept) else (0, 0)
        if low < 0 or high >= len(table):
            raise ValueError(f"linear_cross_entropy: targets must be in [0, {len(table)}) or {NO_TARGET} (no target), "
                             f"got [{low}, {high}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != table.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} and table {table.dtype}; outside "
                         f"autocast they must match")
    else:
        dtype = table.dtype
    # the budget evaluation scores with: a chunk is 256 MiB of float32 logits (a bf16 copy of them beside under
    # autocast), however many positions the batch has; at 100k items still 671 rows, a matmul that fills a GPU
    chunk_size = chunk_size or max(1, SCORE_BUDGET // len(table))
    targets = targets.long()  # gather and scatter index with int64
    with torch.autocast(device_type, enabled=False):  # the casts are explicit in _chunked
        if torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
            return LinearCrossEntropy.apply(hidden, table, targets, float(label_smoothing), chunk_size, dtype)
        return _chunked(hidden, table, targets, float(label_smoothing), chunk_size, dtype, False, False)[0]
