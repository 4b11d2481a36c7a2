"""LayerNorm over a small last dim in Triton, forward and backward.

PyTorch's LayerNorm kernels are built for wide rows. On the (B * T, 64) activations of a RecBLR or SASRec block
they ran far from the copy floor on an H100: the forward 0.77 ms a call on (512 * 1000, 64) float32, where
reading x and writing y take about 0.09 ms; its backward 0.41 ms plus the weight and bias gradients
(benchmarks/RESULTS.md, "Training at scale", session 12). Here a program normalises BM rows at once, each row
whole in registers (D up to MAX_D):

    forward   y = (x - mean) * rstd * weight + bias, keeping mean and rstd (M,) for the backward
    backward  with xhat = (x - mean) * rstd and g = dy * weight:
              dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dweight = sum dy * xhat, dbias = sum dy

A backward program walks row blocks with a stride of the grid, summing dweight and dbias in registers, and
writes one partial sum of each; torch adds the few hundred partial sums: deterministic, without atomics.
Arithmetic in float32; x and y in x's dtype.
"""
import torch
import triton
import triton.language as tl

from kernels.device import check_device, empty, sm_count
from kernels.layer_norm.naive import check_inputs

# Tests set this to fill every output with NaN before the launch, so an element the kernel skips fails.
POISON_OUTPUTS = False
MAX_D = 4096  # a row lives in registers
ELEMENTS = 4096  # rows x padded D a program holds: 64 rows of 64
PROGRAMS_PER_SM = 4  # backward programs, each looping over row blocks


@triton.jit
def _rows(p, rows, o_d, M, D: tl.constexpr):
    # (BM, BD) float32 of a row-major (M, D) tensor, zero past M and D
    m = (rows < M)[:, None] & (o_d < D)[None, :]
    return tl.load(p + rows[:, None].to(tl.int64) * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def layer_norm_fwd_kernel(x, w, b, y, mean, rstd, M, eps, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_x = _rows(x, rows, o_d, M, D)
    mu = tl.sum(b_x, axis=1) / D  # (BM,)
    c = tl.where(m_d[None, :], b_x - mu[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
    w_d = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_d = tl.load(b + o_d, mask=m_d, other=0.0).to(tl.float32)
    out = c * r[:, None] * w_d[None, :] + b_d[None, :]
    m = (rows < M)[:, None] & m_d[None, :]
    tl.store(y + rows[:, None].to(tl.int64) * D + o_d[None, :], out.to(y.dtype.element_ty), mask=m)
    tl.store(mean + rows, mu, mask=rows < M)
    tl.store(rstd + rows, r, mask=rows < M)


@triton.jit
def layer_norm_bwd_kernel(x, w, dy, mean, rstd, dx, parts, M, D: tl.constexpr, BM: tl.constexpr,
                          BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    w_d = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    for first in range(tl.program_id(0) * BM, M, tl.num_programs(0) * BM):
        rows = first + tl.arange(0, BM)
        m_m = rows < M
        mu = tl.load(mean + rows, mask=m_m, other=0.0)
        r = tl.load(rstd + rows, mask=m_m, other=0.0)
        xhat = tl.where(m_d[None, :], (_rows(x, rows, o_d, M, D) - mu[:, None]) * r[:, None], 0.0)
        b_dy = _rows(dy, rows, o_d, M, D)
        g = b_dy * w_d[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        out = (g - xhat * c1[:, None] - c2[:, None]) * r[:, None]
        m = m_m[:, None] & m_d[None, :]
        tl.store(dx + rows[:, None].to(tl.int64) * D + o_d[None, :], out.to(dx.dtype.element_ty), mask=m)
        dw += tl.sum(b_dy * xhat, axis=0)
        db += tl.sum(b_dy, axis=0)
    tl.store(parts + tl.program_id(0) * 2 * D + o_d, dw, mask=m_d)
    tl.store(parts + tl.program_id(0) * 2 * D + D + o_d, db, mask=m_d)


def _tile(D):
    """(BM, BD): rows a program holds and the padded row."""
    BD = triton.next_power_of_2(D)
    return max(1, ELEMENTS // BD), BD


class LayerNormFunction(torch.autograd.Function):
    """Autograd of both kernels on x as (M, D) rows; saves x, weight and the rows' mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape, D = x.shape, x.shape[-1]
        x, weight, bias = x.reshape(-1, D).contiguous(), weight.contiguous(), bias.contiguous()
        M = x.shape[0]
        BM, BD = _tile(D)
        y = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS)
        mean = empty((M,), torch.float32, x.device, POISON_OUTPUTS)
        rstd = empty((M,), torch.float32, x.device, POISON_OUTPUTS)
        layer_norm_fwd_kernel[(triton.cdiv(M, BM),)](x, weight, bias, y, mean, rstd, M, eps, D=D, BM=BM, BD=BD)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape, ctx.bias_dtype = shape, bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        (M, D), (BM, BD) = x.shape, _tile(x.shape[1])
        grid = min(triton.cdiv(M, BM), PROGRAMS_PER_SM * sm_count(x.device))
        dx = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS)
        parts = empty((grid, 2, D), torch.float32, x.device, POISON_OUTPUTS)
        layer_norm_bwd_kernel[(grid,)](x, weight, dy.reshape(-1, D).contiguous(), mean, rstd, dx, parts, M, D=D,
                                       BM=BM, BD=BD)
        dweight, dbias = parts.sum(0)
        return dx.view(ctx.shape), dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None


def fused_layer_norm(x, weight, bias, eps):
    """`kernels.layer_norm` on CUDA tensors, always through the Triton kernels: D up to MAX_D.

    x (..., D) float32 or bfloat16, weight and bias (D,). Returns y in x's dtype (x.shape), computed in float32;
    gradients come back in each input's dtype.
    """
    check_inputs(x, weight, bias)
    check_device(x, "fused_layer_norm", "kernels.layer_norm")
    if x.shape[-1] > MAX_D:
        raise ValueError(f"fused_layer_norm takes D <= {MAX_D}, got {x.shape[-1]}; kernels.layer_norm takes larger")
    return LayerNormFunction.apply(x, weight, bias, eps)
