from kernels.score_topk import fused
from kernels.score_topk.fused import fused_score_topk
from kernels.score_topk.naive import check_inputs, score_topk_reference


def score_topk(hidden, table, k, *, out=None, active=None, index_offset=0):
    """The k largest of hidden @ table.T in each row, best first, without making the (B, N) scores.

    hidden (B, D), table (N, D): float32 or bfloat16 with any strides (a view such as `weight[1:]` is read in
    place, not copied); products are accumulated in float32. Returns (values (B, k) float32, indices (B, k)
    int64 rows of table, plus index_offset); 1 <= k <= N, else ValueError. out = (values, indices), contiguous
    tensors of those shapes, are written and returned instead of new ones; with active (B,) bool too, only its
    rows are written and the others keep what they held (serving: a user without a new event keeps a top-k).
    CUDA tensors take the Triton kernel (`fused_score_topk`, which a CUDA graph can capture) for k <= fused.MAX_K
    (128) and D <= fused.MAX_D (128); CPU tensors, and larger k or D, take `score_topk_reference` (one matmul and
    torch.topk). For ranking: the kernel's values carry no gradient. Ties may come back in either order.
    """
    check_inputs(hidden, table, k, out, active)
    if hidden.is_cuda and k <= fused.MAX_K and hidden.shape[1] <= fused.MAX_D:
        return fused_score_topk(hidden, table, k, out=out, active=active, index_offset=index_offset)
    return score_topk_reference(hidden, table, k, out=out, active=active, index_offset=index_offset)


__all__ = ["fused_score_topk", "score_topk", "score_topk_reference"]
