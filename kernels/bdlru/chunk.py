"""Chunked BD-LRU in Triton: parallel over T as well, for batches too small to fill the GPU.

A sequential-per-channel walk has only B * D / BD programs; at B = 8 that is a few per SM and the GPU idles
on latency. Here T is cut into chunks of CT rows and each direction takes three launches:
  1. per chunk, the composition of its steps as one affine map h -> A h + H (local scan from zero);
  2. per channel, a scan over the chunks' maps giving the carry into each chunk (B * NC * D floats);
  3. the fused kernel of `fused_recurrent.py` on every chunk at once, started from its carry.
The backward does the same in reverse time on q = a_t dL/dh_t. Step 1 reads r, i, x (r, z, do backwards)
once more than the fused kernel, the price of the parallelism.
"""
import torch
import triton
import triton.language as tl

from kernels.bdlru import fused_recurrent
from kernels.bdlru.fused_recurrent import (_batch_start, _contiguous, _empty, _fit, _kernel_inputs,
                                           _linear_combine, _linear_combine_excl, _load_tile, _softplus,
                                           _strides)
from kernels.bdlru.naive import check_inputs


@triton.jit(do_not_specialize=["T", "CT"])
def chunk_fwd_summary_kernel(
    x, r, i, lam, A_c, H_c,
    sx_b, sx_t, sr_b, sr_t, si_b, si_t,
    T, CT,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, r, i = _batch_start(x, r, i, i_b, sx_b, sr_b, si_b)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    sp = _softplus(tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32))
    acc_a, acc_h = tl.full([BD], 1.0, tl.float32), tl.zeros([BD], dtype=tl.float32)
    for s in range(i_c * CT, tl.minimum(i_c * CT + CT, T), BT):
        t = s + o_t
        m = (t < T)[:, None] & m_d[None, :]
        b_x, b_r, b_i, _ = _load_tile(x, r, i, x, t, o_d, sx_t, sr_t, si_t, 0, m, False)
        a = tl.where(m, tl.exp(-sp[None, :] * tl.sigmoid(b_r)), 1.0)
        bx = tl.sqrt(1.0 - a * a + 1e-8) * tl.sigmoid(b_i) * b_x
        A, H = tl.associative_scan((a, bx), 0, _linear_combine)
        last = o_t[:, None] == BT - 1
        acc_a, acc_h = _linear_combine(
            acc_a, acc_h, tl.sum(tl.where(last, A, 0.0), axis=0), tl.sum(tl.where(last, H, 0.0), axis=0)
        )
    o_c = (i_b * tl.num_programs(1) + i_c) * D + o_d
    tl.store(A_c + o_c, acc_a, mask=m_d)
    tl.store(H_c + o_c, acc_h, mask=m_d)


@triton.jit(do_not_specialize=["T", "CT"])
def chunk_bwd_summary_kernel(
    r, lam, z, do, A_c, Q_c,
    sr_b, sr_t, sz_b, sz_t,
    T, CT,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_Z: tl.constexpr,
):
    i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    r += i_b * sr_b
    if HAS_Z:
        z += i_b * sz_b
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    sp = _softplus(tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32))
    acc_a, acc_q = tl.full([BD], 1.0, tl.float32), tl.zeros([BD], dtype=tl.float32)
    base = i_b * T * D
    for s in range(i_c * CT, tl.minimum(i_c * CT + CT, T), BT):
        t = s + o_t
        m = (t < T)[:, None] & m_d[None, :]
        off = base + t[:, None] * D + o_d[None, :]  # (BT, BD) of do, which is contiguous
        b_r = tl.load(r + t[:, None] * sr_t + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z + t[:, None] * sz_t + o_d[None, :], mask=m, other=0.0).to(tl.float32)
            g = g * b_z * tl.sigmoid(b_z)
        a = tl.where(m, tl.exp(-sp[None, :] * tl.sigmoid(b_r)), 1.0)
        # q_t = a_t (g_t + q_{t+1}), composed from the tile's end: row 0 holds the whole tile's map
        A, Q = tl.associative_scan((a, a * g), 0, _linear_combine, reverse=True)
        first = o_t[:, None] == 0
        # tiles go forward in time but q flows backwards: this tile's map applies before the earlier
        # tiles' accumulated one
        acc_a, acc_q = _linear_combine(
            tl.sum(tl.where(first, A, 0.0), axis=0), tl.sum(tl.where(first, Q, 0.0), axis=0), acc_a, acc_q
        )
    o_c = (i_b * tl.num_programs(1) + i_c) * D + o_d
    tl.store(A_c + o_c, acc_a, mask=m_d)
    tl.store(Q_c + o_c, acc_q, mask=m_d)


@triton.jit
def chunk_carry_kernel(
    A_c, H_c, h0, h_in,
    NC,
    D: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
):
    # h_in[b, c], the state entering chunk c, is an exclusive scan over the chunks' maps: all BC of them
    # in one tile, so the walk costs one load's latency, not NC
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_c = tl.arange(0, BC)
    m = (o_c < NC)[:, None] & m_d[None, :]
    off = (i_b * NC + o_c[:, None]) * D + o_d[None, :]  # (BC, BD)
    a = tl.load(A_c + off, mask=m, other=1.0)
    h = tl.load(H_c + off, mask=m, other=0.0)
    one, zero = tl.full([BC, BD], 1.0, tl.float32), tl.zeros([BC, BD], dtype=tl.float32)
    _, _, Ap, Hp = tl.associative_scan((a, h, one, zero), 0, _linear_combine_excl, reverse=REVERSE)
    if HAS_H0:
        Hp += Ap * tl.load(h0 + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    tl.store(h_in + off, Hp, mask=m)


# (BT, (BD, num_warps) forward, (BD, num_warps) backward): from the sweep at (8, 4096, 128) on an H100, where
# narrow blocks and 64-row chunks (about 32 programs per SM) were fastest in both directions
TILES = (8, (16, 1), (16, 1))


def _chunk_config(B, T, D, n_sm):
    """BT, (BD, num_warps) forward and backward, and the chunk length CT (a multiple of BT)."""
    BT, fwd, bwd = _fit(TILES, T, D)
    # about 32 programs per SM, but no chunk shorter than 4 tiles
    n_chunks = triton.cdiv(32 * n_sm, B * triton.cdiv(D, min(fwd[0], bwd[0])))
    CT = BT * max(4, triton.cdiv(triton.cdiv(T, n_chunks), BT))
    return BT, fwd, bwd, CT


def _carry(A_c, H_c, h0, reverse):
    B, NC, D = A_c.shape
    h_in = _empty(B, NC, D, dtype=torch.float32, device=A_c.device)
    BC = triton.next_power_of_2(NC)
    BD = min(triton.next_power_of_2(D), max(4, 2048 // BC))  # at most ~16 elements a thread
    chunk_carry_kernel[(triton.cdiv(D, BD), B)](
        A_c, H_c, h0, h_in, NC, D=D, BC=BC, BD=BD, HAS_H0=h0 is not None, REVERSE=reverse, num_warps=4
    )
    return h_in


def chunk_bdlru_fwd(x, r, i, lam, z, h0, store_ckpt, store_ht, BT, fwd, CT):
    B, T, D = x.shape
    NC = triton.cdiv(T, CT)
    A_c, H_c = (_empty(B, NC, D, dtype=torch.float32, device=x.device) for _ in range(2))
    BD, num_warps = fwd
    chunk_fwd_summary_kernel[(triton.cdiv(D, BD), NC, B)](
        x, r, i, lam, A_c, H_c, *_strides(x, r, i, None)[:6], T, CT, D=D, BT=BT, BD=BD, num_warps=num_warps
    )
    h_in = _carry(A_c, H_c, h0, reverse=False)
    return fused_recurrent.bdlru_fwd(x, r, i, lam, z, h_in, store_ckpt, store_ht, BT, BD, num_warps, NC, CT)


def chunk_bdlru_bwd(x, r, i, lam, z, ckpt, do, dht, store_dq0, BT, bwd, CT):
    B, T, D = x.shape
    NC = triton.cdiv(T, CT)
    A_c, Q_c = (_empty(B, NC, D, dtype=torch.float32, device=x.device) for _ in range(2))
    BD, num_warps = bwd
    _, _, sr_b, sr_t, _, _, sz_b, sz_t = _strides(x, r, i, z)
    chunk_bwd_summary_kernel[(triton.cdiv(D, BD), NC, B)](
        r, lam, z, do, A_c, Q_c, sr_b, sr_t, sz_b, sz_t, T, CT, D=D, BT=BT, BD=BD, HAS_Z=z is not None,
        num_warps=num_warps
    )
    q_in = _carry(A_c, Q_c, dht, reverse=True)
    return fused_recurrent.bdlru_bwd(x, r, i, lam, z, ckpt, do, q_in, store_dq0, BT, BD, num_warps, NC, CT)


class ChunkBDLRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, i, lam, z, h0, return_state):
        x, r, i, z, lam, h0 = _kernel_inputs(x, r, i, lam, z, h0)
        B, T, D = x.shape
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        BT, fwd, bwd, CT = _chunk_config(B, T, D, n_sm)
        needs_grad = any(ctx.needs_input_grad[:6])
        o, ckpt, ht = chunk_bdlru_fwd(x, r, i, lam, z, h0, needs_grad, return_state, BT, fwd, CT)
        if needs_grad:
            ctx.save_for_backward(x, r, i, lam, z, ckpt)
            ctx.config, ctx.h0_dtype = (BT, bwd, CT), h0.dtype if h0 is not None else None
        return (o, ht) if return_state else o

    @staticmethod
    def backward(ctx, do, dht=None):
        x, r, i, lam, z, ckpt = ctx.saved_tensors
        do, dht = _contiguous(do, dht)
        has_h0 = ctx.h0_dtype is not None
        dx, dr, di, dlam, dz, dh0 = chunk_bdlru_bwd(x, r, i, lam, z, ckpt, do, dht, has_h0, *ctx.config)
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dx, dr, di, dlam.to(lam.dtype), dz, dh0, None


def chunk_bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """BD-LRU on CUDA tensors, parallel over chunks of T too; same contract as `kernels.bdlru`.

    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). Returns h * silu(z) (or h) in
    the input dtype, and with return_state the final state h_T (B, D) in float32.
    """
    check_inputs(x, r, i, lam, z, h0)
    fused_recurrent.check_device(x, "chunk_bdlru")
    return ChunkBDLRUFunction.apply(x, r, i, lam, z, h0, return_state)
