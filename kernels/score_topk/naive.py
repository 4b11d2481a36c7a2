"""Plain-PyTorch score + top-k: the ground truth the fused kernel is tested against, and the CPU path."""
import torch

from kernels.device import check_float_inputs, copy_active


def check_inputs(hidden, table, k, out=None, active=None):
    """Raise ValueError unless hidden (B, D), table (N, D), k and out / active (see `kernels.score_topk`) fit one
    score + top-k call."""
    if hidden.dim() != 2 or table.dim() != 2:
        raise ValueError(f"hidden must be (B, D) and table (N, D), got {tuple(hidden.shape)} and "
                         f"{tuple(table.shape)}")
    if hidden.shape[1] != table.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[1]} but table has D={table.shape[1]}")
    if not 1 <= k <= table.shape[0]:
        raise ValueError(f"k must be in 1..{table.shape[0]} (the table's rows), got {k}")
    check_float_inputs(hidden=hidden, table=table)
    B = hidden.shape[0]
    if out is not None:
        values, indices = out
        for name, t, dtype in (("values", values, torch.float32), ("indices", indices, torch.int64)):
            if t.shape != (B, k) or t.dtype != dtype or t.device != hidden.device or not t.is_contiguous():
                raise ValueError(f"out's {name} must be a contiguous {dtype} ({B}, {k}) on {hidden.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if active is not None:
        if out is None:
            raise ValueError("active needs out: the rows it leaves out keep what out holds")
        if active.shape != (B,) or active.dtype != torch.bool or active.device != hidden.device:
            raise ValueError(f"active must be a bool ({B},) on {hidden.device}, got {active.dtype} "
                             f"{tuple(active.shape)} on {active.device}")


def score_topk_reference(hidden, table, k, *, out=None, active=None, index_offset=0):
    """The k largest of hidden @ table.T per row, best first, from the whole (B, N) scores in float32.

    Same contract as `kernels.score_topk`: (values (B, k) float32, indices (B, k) int64).
    """
    check_inputs(hidden, table, k, out, active)
    with torch.autocast(hidden.device.type, enabled=False):  # a caller's autocast would score in bfloat16
        scores = hidden.float() @ table.float().T  # (B, N)
    values, indices = scores.topk(k, dim=1)
    indices += index_offset
    if out is None:
        return values, indices
    for dst, src in zip(out, (values, indices)):
        copy_active(dst, src, active)
    return out
