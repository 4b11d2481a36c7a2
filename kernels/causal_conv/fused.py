"""Fused causal depthwise conv + SiLU in Triton, forward and backward.

RecBLR's layer convolves each channel of x (one half of in_proj's (B, T, 2C) output) over its last K steps and
applies SiLU. In PyTorch that is a transpose to (B, C, T), cuDNN's conv1d padded K-1 on both sides, a slice
back to T, a transpose, SiLU, and a copy of the strided result when the next Linear reads it: several passes
over (B, T, C), each a kernel. Here a program owns one (BT, BC) tile of one sequence and writes

    y[t] = silu(bias + sum_j w[:, j] * x[t - (K-1) + j])    (x = 0 before t = 0)

in float32, reading x in place through its batch and row strides, so the half of in_proj's output is never
copied. The K-1 rows before the tile come from shifted masked loads; the tile's own loads have just brought
them into cache.

The backward recomputes the pre-activation rather than saving it: saving would write and read another
(B, T, C), while recomputing reads x, which dweight needs anyway. With g = dy * silu'(pre),

    dx[t] = sum_s w[:, K-1-s] * g[t+s]    dweight[:, K-1-s] = sum_t g[t+s] * x[t]    dbias = sum_t g[t]

so dx at a row needs g at the K-1 rows after it. A backward program computes g once on its BT rows and owns
the first BT-(K-1) of them: the last K-1 are the next program's first, recomputed here rather than handed over
by a second launch. The shifted g[t+s] are tl.gather on the tile in registers (through shared memory).
Recomputing g at K shifted sets of rows instead (commit 98212ca) costs, per element, K sigmoids and K*K+K+1
tile loads, against one sigmoid and K+2 loads here; at (32, 64) fp32 tiles ptxas (sm_90) counts 162 registers
and 2376 instructions for that kernel, 128 and 1664 for this one. No GPU timing of either yet. dweight and
dbias are each program's sums over its own rows, written to a float32 buffer and summed by torch:
deterministic, without atomics.
"""
import torch
import triton
import triton.language as tl

from kernels.causal_conv.naive import check_inputs
from kernels.device import check_device, empty

# Tests set this to fill every output (and the partial sums) with NaN before the launch, so an element the
# kernel skips fails.
POISON_OUTPUTS = False


@triton.jit
def _x_rows(x, rows, o_c, s_t, T, C: tl.constexpr):
    # (BT, BC) of x at rows, float32; zero before t = 0 (the causal padding), past T and past C
    m = ((rows >= 0) & (rows < T))[:, None] & (o_c < C)[None, :]
    return tl.load(x + rows[:, None] * s_t + o_c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _tap(w, o_c, j, C: tl.constexpr, K: tl.constexpr):
    # (BC,) column j of the (C, K) weight
    return tl.load(w + o_c * K + j, mask=o_c < C, other=0.0).to(tl.float32)


@triton.jit
def _pre(x, w, bias, rows, o_c, s_t, T, C: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # (BT, BC) pre-activation at rows: bias + sum_j w[:, j] * x[rows - (K-1) + j]
    acc = _tap(w, o_c, 0, C, K)[None, :] * _x_rows(x, rows - (K - 1), o_c, s_t, T, C)
    for j in tl.static_range(1, K):
        acc += _tap(w, o_c, j, C, K)[None, :] * _x_rows(x, rows - (K - 1) + j, o_c, s_t, T, C)
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=o_c < C, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grad_pre(x, w, bias, dy, rows, o_c, s_t, T, C: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # (BT, BC) g = dy * silu'(pre) at rows, zero past T (dy's masked load) and past C
    pre = _pre(x, w, bias, rows, o_c, s_t, T, C, K, HAS_BIAS)
    m = (rows < T)[:, None] & (o_c < C)[None, :]
    sg = tl.sigmoid(pre)
    b_dy = tl.load(dy + rows[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    return b_dy * sg * (1.0 + pre * (1.0 - sg))


@triton.jit(do_not_specialize=["T"])
def causal_conv_silu_fwd_kernel(
    x, w, bias, y, sx_b, sx_t, T,
    C: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x += i_b * sx_b
    y += i_b * T * C  # y is contiguous (B, T, C)
    o_c = i_c * BC + tl.arange(0, BC)
    rows = i_t * BT + tl.arange(0, BT)
    pre = _pre(x, w, bias, rows, o_c, sx_t, T, C, K, HAS_BIAS)
    m = (rows < T)[:, None] & (o_c < C)[None, :]
    tl.store(y + rows[:, None] * C + o_c[None, :], (pre * tl.sigmoid(pre)).to(y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def causal_conv_silu_bwd_kernel(
    x, w, bias, dy, dx, parts, sx_b, sx_t, T,
    C: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    OT: tl.constexpr = BT - (K - 1)  # rows the program owns; BT >= K
    i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x += i_b * sx_b
    dy += i_b * T * C  # dy and dx are contiguous (B, T, C)
    dx += i_b * T * C
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_t = tl.arange(0, BT)
    rows = i_t * OT + o_t
    b_x = _x_rows(x, rows, o_c, sx_t, T, C)  # (BT, BC)
    g = _grad_pre(x, w, bias, dy, rows, o_c, sx_t, T, C, K, HAS_BIAS)  # (BT, BC)
    own = ((o_t < OT) & (rows < T))[:, None] & m_c[None, :]
    b_dx = tl.zeros_like(b_x)
    # the program's (K+1, C) slice of parts: its share of dweight[:, j] (rows j < K) and of dbias (row K)
    parts += ((i_b * tl.num_programs(1) + i_t) * (K + 1)) * C + o_c
    for s in tl.static_range(K):
        if s == 0:
            g_s = g
        else:  # g[t+s] for every owned row t; the clamp only feeds rows the program does not own
            g_s = tl.gather(g, tl.broadcast_to(tl.minimum(o_t + s, BT - 1)[:, None], (BT, BC)), axis=0)
        b_dx += _tap(w, o_c, K - 1 - s, C, K)[None, :] * g_s
        tl.store(parts + (K - 1 - s) * C, tl.sum(tl.where(own, b_x * g_s, 0.0), axis=0), mask=m_c)
    tl.store(parts + K * C, tl.sum(tl.where(own, g, 0.0), axis=0), mask=m_c)
    tl.store(dx + rows[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=own)


# (BT rows, BC channels, num_warps) per direction, from `benchmarks/causal_conv_kernel.py --sweep` on an H100
# (9 tiles a direction at the four shapes of the benchmark): the forward's (16, 128, 4) is the best (or tied)
# at every shape; the backward's (32, 32, 2) is the best at three and 8% off (64, 64, 4) at 512 x 1024,
# the lowest sum over the four. The backward's programs overlap by K-1 rows, so it keeps 32 rows.
TILES = {"fwd": (16, 128, 4), "bwd": (32, 32, 2)}


def _fit(tile, T, C, K=1):
    """(BT, BC, num_warps) no larger than T (and the backward's K-1 overlapping rows) and C need, each rounded up
    to a power of two, with BT >= K so that a backward program owns a row."""
    BT, BC, num_warps = tile
    BT = max(min(BT, triton.next_power_of_2(T + K - 1)), triton.next_power_of_2(K))
    return BT, min(BC, triton.next_power_of_2(C)), num_warps


def causal_conv_silu_fwd(x, weight, bias, BT, BC, num_warps):
    """y (B, T, C), contiguous in x's dtype, from x with adjacent channels and a contiguous weight (C, K)."""
    B, T, C = x.shape
    y = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS)
    causal_conv_silu_fwd_kernel[(triton.cdiv(C, BC), triton.cdiv(T, BT), B)](
        x, weight, bias, y, x.stride(0), x.stride(1), T, C=C, K=weight.shape[1], BT=BT, BC=BC,
        HAS_BIAS=bias is not None, num_warps=num_warps,
    )
    return y


def causal_conv_silu_bwd(x, weight, bias, dy, BT, BC, num_warps):
    """dx (B, T, C) in x's dtype, dweight (C, K) and dbias (C,) in float32, from a contiguous dy (B, T, C).
    BT >= K: a program owns BT-(K-1) rows."""
    B, T, C = x.shape
    K = weight.shape[1]
    if BT < K:
        raise ValueError(f"the backward's BT={BT} rows must cover the K={K} taps")
    dx = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS)
    grid = (triton.cdiv(C, BC), triton.cdiv(T, BT - (K - 1)), B)
    parts = empty((B * grid[1], K + 1, C), torch.float32, x.device, POISON_OUTPUTS)  # per (sequence, T block)
    causal_conv_silu_bwd_kernel[grid](
        x, weight, bias, dy, dx, parts, x.stride(0), x.stride(1), T, C=C, K=K, BT=BT, BC=BC,
        HAS_BIAS=bias is not None, num_warps=num_warps,
    )
    total = parts.sum(0)  # (K + 1, C)
    return dx, total[:K].T, total[K]


class CausalConvSiLUFunction(torch.autograd.Function):
    """Autograd of both launchers; saves only x (in place, a view if it was one), weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.stride(2) != 1:  # the kernels step over channels one element at a time
            x = x.contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(x, weight, bias)
        return causal_conv_silu_fwd(x, weight, bias, *_fit(TILES["fwd"], *x.shape[1:]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        tile = _fit(TILES["bwd"], *x.shape[1:], K=weight.shape[1])
        dx, dweight, dbias = causal_conv_silu_bwd(x, weight, bias, dy.contiguous(), *tile)
        return dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None


def fused_causal_conv_silu(x, weight, bias=None):
    """`kernels.causal_conv_silu` on CUDA tensors, always through the Triton kernels.

    x (B, T, C) float32 or bfloat16 with any batch and row strides (a half of a wider projection is read in
    place; channels must be adjacent, else x is copied first); weight (C, K), bias (C,) or None, each float32
    or bfloat16 whatever x is (autocast leaves them float32). Returns y (B, T, C) contiguous in x's dtype,
    accumulated in float32; gradients come back in each input's dtype.
    """
    check_inputs(x, weight, bias)
    check_device(x, "fused_causal_conv_silu", "kernels.causal_conv_silu")
    return CausalConvSiLUFunction.apply(x, weight, bias)
