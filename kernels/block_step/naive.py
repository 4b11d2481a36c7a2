"""Plain-PyTorch step of one RecBLR block: the ground truth the fused kernel is tested against, and the CPU path."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.bdlru.naive import bdlru_gates
from kernels.device import copy_active


class BlockWeights(NamedTuple):
    """The parameters one block's step reads (E = expand * D channels, k conv taps, F = the PFFN's width)."""

    in_proj: torch.Tensor  # (2E, D): the x rows, then the z rows
    conv: tuple[torch.Tensor, torch.Tensor] | None  # depthwise taps (E, k), oldest first, and bias (E,)
    gates: tuple[torch.Tensor, torch.Tensor]  # (2E, E): the r rows, then the i rows; bias (2E,)
    lam: torch.Tensor  # (E,)
    out_proj: torch.Tensor  # (D, E)
    ln_1: tuple[torch.Tensor, torch.Tensor]  # LayerNorm weight and bias, (D,) each
    ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # (F, D), (F,), (D, F), (D,)
    ln_2: tuple[torch.Tensor, torch.Tensor] | None  # with ffn
    eps: float  # of every LayerNorm
    # a LayerNorm on the block's input first: the model's embedding LayerNorm, folded into its first block
    ln_in: tuple[torch.Tensor, torch.Tensor] | None = None


def check_inputs(u, window, h, w: BlockWeights, active=None, rows=None) -> None:
    """Raise ValueError unless u (B, D), or u (N, D) and rows (B,) int64, window (B, E, k - 1), h (B, E) and
    active (B,) bool or None fit the weights."""
    E, D = w.lam.shape[0], w.in_proj.shape[1]
    B = u.shape[0] if rows is None else rows.shape[0]
    taps = 0 if w.conv is None else w.conv[0].shape[1] - 1
    expected = {"u": (u, (u.shape[0], D)), "window": (window, (B, E, taps)), "h": (h, (B, E))}
    for name, (t, shape) in expected.items():
        if t.dim() != len(shape) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for these weights, got {tuple(t.shape)}")
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 (B,), got {rows.dtype} {tuple(rows.shape)}")
    if (w.ffn is None) != (w.ln_2 is None):
        raise ValueError("ffn and ln_2 come together: give both or neither")
    if active is not None and (active.shape != (B,) or active.dtype != torch.bool):
        raise ValueError(f"active must be a bool ({B},), got {active.dtype} {tuple(active.shape)}")


def block_step_reference(u, window, h, w: BlockWeights, active=None, rows=None):
    """One event through a block in eval mode (no dropout): u (B, D) (or u[rows]), the conv window (B, E, k - 1)
    of past pre-conv inputs, oldest first, and the BD-LRU state h (B, E) -> out (B, D); window and h advance in
    place, in the rows where active (B,) is True (all rows when None)."""
    check_inputs(u, window, h, w, active, rows)
    D = u.shape[1]
    if rows is not None:
        u = u[rows]
    if w.ln_in is not None:
        u = F.layer_norm(u, (D,), *w.ln_in, w.eps)
    x, z = F.linear(u, w.in_proj).chunk(2, dim=-1)  # (B, E) each
    new_window = window
    if w.conv is not None:
        taps = torch.cat([window, x[:, :, None]], dim=-1)  # (B, E, k)
        x = (taps * w.conv[0]).sum(-1) + w.conv[1]
        new_window = taps[:, :, 1:]
    x = F.silu(x)
    r, i = F.linear(x, *w.gates).chunk(2, dim=-1)  # (B, E) each
    a, b = bdlru_gates(r, i, w.lam)
    new_h = a * h + b * x
    out = F.layer_norm(u + F.linear(new_h * F.silu(z), w.out_proj), (D,), *w.ln_1, w.eps)
    if w.ffn is not None:
        w_1, b_1, w_2, b_2 = w.ffn
        out = F.layer_norm(out + F.linear(F.silu(F.linear(out, w_1, b_1)), w_2, b_2), (D,), *w.ln_2, w.eps)
    copy_active(window, new_window, active)
    copy_active(h, new_h, active)
    return out
