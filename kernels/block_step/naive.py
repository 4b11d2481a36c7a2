"""Plain-PyTorch step of one RecBLR block: the ground truth the fused kernel is tested against, and the CPU path."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.bdlru.naive import bdlru_gates


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
    eps: float  # of both LayerNorms


def check_inputs(u, window, h, w: BlockWeights) -> None:
    """Raise ValueError unless u (B, D), window (B, E, k - 1) and h (B, E) fit the weights."""
    E, D = w.lam.shape[0], w.in_proj.shape[1]
    taps = 0 if w.conv is None else w.conv[0].shape[1] - 1
    expected = {"u": (u, (u.shape[0], D)), "window": (window, (u.shape[0], E, taps)), "h": (h, (u.shape[0], E))}
    for name, (t, shape) in expected.items():
        if t.dim() != len(shape) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for these weights, got {tuple(t.shape)}")
    if (w.ffn is None) != (w.ln_2 is None):
        raise ValueError("ffn and ln_2 come together: give both or neither")


def block_step_reference(u, window, h, w: BlockWeights):
    """One event through a block in eval mode (no dropout): u (B, D), the conv window (B, E, k - 1) of past
    pre-conv inputs, oldest first, and the BD-LRU state h (B, E) -> (out (B, D), window, h)."""
    check_inputs(u, window, h, w)
    x, z = F.linear(u, w.in_proj).chunk(2, dim=-1)  # (B, E) each
    if w.conv is not None:
        taps = torch.cat([window, x[:, :, None]], dim=-1)  # (B, E, k)
        x = (taps * w.conv[0]).sum(-1) + w.conv[1]
        window = taps[:, :, 1:]
    x = F.silu(x)
    r, i = F.linear(x, *w.gates).chunk(2, dim=-1)  # (B, E) each
    a, b = bdlru_gates(r, i, w.lam)
    h = a * h + b * x
    D = u.shape[1]
    out = F.layer_norm(u + F.linear(h * F.silu(z), w.out_proj), (D,), *w.ln_1, w.eps)
    if w.ffn is not None:
        w_1, b_1, w_2, b_2 = w.ffn
        out = F.layer_norm(out + F.linear(F.silu(F.linear(out, w_1, b_1)), w_2, b_2), (D,), *w.ln_2, w.eps)
    return out, window, h
