import torch

from kernels.block_step import fused
from kernels.block_step.fused import fused_block_step
from kernels.block_step.naive import BlockWeights, block_step_reference


def block_step(u, window, h, weights: BlockWeights, active=None, rows=None):
    """One event through one RecBLR block in eval mode (no dropout), for a batch of users.

    u (B, D) the block's input, window (B, E, k - 1) the last pre-conv inputs (oldest first; k - 1 = 0 without
    the conv), h (B, E) the BD-LRU state -> out (B, D). With rows (B,) int64, u is a table (N, D) and user b's
    input is u[rows[b]]; with weights.ln_in, a LayerNorm of the input comes first: so the model's embedding lookup
    and LayerNorm run inside its first block. The state advances in place, in the rows where active (B,) bool is
    True (every row when None): serving keeps it in fixed buffers, and a user without an event keeps theirs.
    CUDA tensors outside autograd that the kernel takes (`fused.refusal`: float32 throughout, a contiguous state,
    a block within `fused.fits`) go to the Triton kernel (`fused_block_step`, one launch; a CUDA graph can
    capture it); everything else, CPU tensors included, takes `block_step_reference`.
    """
    if u.is_cuda and not torch.is_grad_enabled() and fused.refusal(u, window, h, weights) is None:
        return fused_block_step(u, window, h, weights, active, rows)
    return block_step_reference(u, window, h, weights, active, rows)


__all__ = ["BlockWeights", "block_step", "block_step_reference", "fused_block_step"]
