"""Plain-PyTorch score + top-k: the ground truth the fused kernel is tested against, and the CPU path."""
import torch

from kernels.device import check_float_inputs


def check_inputs(hidden, table, k):
    """Raise ValueError unless hidden (B, D), table (N, D) and k fit one score + top-k call."""
    if hidden.dim() != 2 or table.dim() != 2:
        raise ValueError(f"hidden must be (B, D) and table (N, D), got {tuple(hidden.shape)} and "
                         f"{tuple(table.shape)}")
    if hidden.shape[1] != table.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[1]} but table has D={table.shape[1]}")
    if not 1 <= k <= table.shape[0]:
        raise ValueError(f"k must be in 1..{table.shape[0]} (the table's rows), got {k}")
    check_float_inputs(hidden=hidden, table=table)


def score_topk_reference(hidden, table, k):
    """The k largest of hidden @ table.T per row, best first, from the whole (B, N) scores in float32.

    Same contract as `kernels.score_topk`: (values (B, k) float32, indices (B, k) int64).
    """
    check_inputs(hidden, table, k)
    with torch.autocast(hidden.device.type, enabled=False):  # a caller's autocast would score in bfloat16
        scores = hidden.float() @ table.float().T  # (B, N)
    values, indices = scores.topk(k, dim=1)
    return values, indices
