"""Fused BD-LRU in Triton: gates, scan and output gate in one pass, forward and backward.

Each program owns one (batch, channel block) and walks T in tiles of BT rows: a tile's loads are all in
flight at once and the scan inside the tile is an associative scan, so the walk costs T/BT dependent steps,
not T. The forward saves h (the output itself when there is no z) so the backward reads h_{t-1} directly
instead of recomputing it; the backward walks the tiles from the end and rebuilds the gates from r and i.
"""
import os

import torch
import triton
import triton.language as tl

from kernels.bdlru.naive import check_inputs

# Tests set this to fill every output with NaN before the launch, so an element the kernel skips fails.
POISON_OUTPUTS = False


@triton.jit
def _linear_combine(a1, h1, a2, h2):
    # (a1, h1) precedes (a2, h2) in scan order; composing h -> a1*h + h1 then h -> a2*h + h2
    return a1 * a2, a2 * h1 + h2


@triton.jit
def _softplus(v):
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit(do_not_specialize=["T"])
def bdlru_fwd_kernel(
    x, r, i, lam, z, h0, o, hs, ht,
    T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STORE_H: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    sp = _softplus(tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32))  # (BD,)
    if HAS_H0:
        h = tl.load(h0 + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD], dtype=tl.float32)
    base = i_b * T * D
    for s in range(0, T, BT):
        t = s + o_t
        m = (t < T)[:, None] & m_d[None, :]
        off = base + t[:, None] * D + o_d[None, :]  # (BT, BD)
        b_x = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
        b_r = tl.load(r + off, mask=m, other=0.0).to(tl.float32)
        b_i = tl.load(i + off, mask=m, other=0.0).to(tl.float32)
        # padded rows get a = 1, b*x = 0, so the tile's last row carries h_{T-1}
        a = tl.where(m, tl.exp(-sp[None, :] * tl.sigmoid(b_r)), 1.0)
        bx = tl.sqrt(1.0 - a * a + 1e-8) * tl.sigmoid(b_i) * b_x
        A, H = tl.associative_scan((a, bx), 0, _linear_combine)
        H = H + A * h[None, :]
        h = tl.sum(tl.where(o_t[:, None] == BT - 1, H, 0.0), axis=0)
        if HAS_Z:
            b_z = tl.load(z + off, mask=m, other=0.0).to(tl.float32)
            tl.store(o + off, (H * b_z * tl.sigmoid(b_z)).to(o.dtype.element_ty), mask=m)
            if STORE_H:
                tl.store(hs + off, H.to(hs.dtype.element_ty), mask=m)
        else:
            tl.store(o + off, H.to(o.dtype.element_ty), mask=m)
    if STORE_HT:
        tl.store(ht + i_b * D + o_d, h, mask=m_d)


@triton.jit(do_not_specialize=["T"])
def bdlru_bwd_kernel(
    x, r, i, lam, z, h0, hs, do, dht, dx, dr, di, dz, dlam, dh0,
    T,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    b_lam = tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32)
    sp = _softplus(b_lam)
    if HAS_DHT:
        dh = tl.load(dht + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # dL/dh_{t} carried backwards
    else:
        dh = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        b_h0 = tl.load(h0 + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    dlam_acc = tl.zeros([BD], dtype=tl.float32)
    base = i_b * T * D
    for s in range(0, T, BT):
        t = T - 1 - s - o_t  # descending, so a forward scan over rows runs backwards in time
        m = (t >= 0)[:, None] & m_d[None, :]
        off = base + t[:, None] * D + o_d[None, :]  # (BT, BD)
        b_x = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
        b_r = tl.load(r + off, mask=m, other=0.0).to(tl.float32)
        b_i = tl.load(i + off, mask=m, other=0.0).to(tl.float32)
        b_do = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
        h_prev = tl.load(hs + off - D, mask=m & (t > 0)[:, None], other=0.0).to(tl.float32)
        if HAS_H0:
            h_prev += tl.where((t == 0)[:, None], b_h0[None, :], 0.0)
        # a_{t+1}; 1 past the end, where the carry is dL/dh_T itself
        m_next = m & (t + 1 < T)[:, None]
        r_next = tl.load(r + off + D, mask=m_next, other=0.0).to(tl.float32)
        a_next = tl.where(m_next, tl.exp(-sp[None, :] * tl.sigmoid(r_next)), 1.0)
        sr = tl.sigmoid(b_r)
        a = tl.exp(-sp[None, :] * sr)
        sq = tl.sqrt(1.0 - a * a + 1e-8)
        si = tl.sigmoid(b_i)
        if HAS_Z:
            b_z = tl.load(z + off, mask=m, other=0.0).to(tl.float32)
            b_h = tl.load(hs + off, mask=m, other=0.0).to(tl.float32)
            sz = tl.sigmoid(b_z)
            g = b_do * b_z * sz
            tl.store(dz + off, (b_do * b_h * sz * (1.0 + b_z * (1.0 - sz))).to(dz.dtype.element_ty), mask=m)
        else:
            g = b_do
        # dh_t = g_t + a_{t+1} dh_{t+1}: the same linear recurrence as the forward, in reverse time
        U, DH = tl.associative_scan((a_next, g), 0, _linear_combine)
        DH = DH + U * dh[None, :]
        dh = tl.sum(tl.where(o_t[:, None] == BT - 1, DH, 0.0), axis=0)
        db = DH * b_x
        # total derivative through a, including b = sqrt(1 - a^2 + eps) * sigmoid(i)
        dA = DH * h_prev - db * si * a / sq
        tl.store(dx + off, (DH * sq * si).to(dx.dtype.element_ty), mask=m)
        tl.store(dr + off, (dA * (-sp[None, :] * a) * sr * (1.0 - sr)).to(dr.dtype.element_ty), mask=m)
        tl.store(di + off, (db * sq * si * (1.0 - si)).to(di.dtype.element_ty), mask=m)
        dlam_acc += tl.sum(tl.where(m, dA * (-sr * a), 0.0), axis=0)
    tl.store(dlam + i_b * D + o_d, dlam_acc * tl.sigmoid(b_lam), mask=m_d)
    if HAS_H0:
        a0 = tl.exp(-sp * tl.sigmoid(tl.load(r + base + o_d, mask=m_d, other=0.0).to(tl.float32)))
        tl.store(dh0 + i_b * D + o_d, a0 * dh, mask=m_d)


def _empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _config(B, T, D, dtype, backward):
    """(BT, BD, num_warps), from `benchmarks/bdlru_kernel.py --sweep` on an H100."""
    if B * triton.cdiv(D, 32) < 512:
        # too few sequences to fill the GPU: narrow channel blocks make more programs, long tiles keep
        # more loads in flight per program
        BT, BD, num_warps = 256, 8, 4
    elif dtype == torch.float32:
        BT, BD, num_warps = (8, 128, 4) if backward else (16, 64, 4)
    else:
        BT, BD, num_warps = 8, 64, 2
    return min(BT, triton.next_power_of_2(T)), min(BD, triton.next_power_of_2(D)), num_warps


def bdlru_fwd(x, r, i, lam, z, h0, store_h, store_ht, config=None):
    B, T, D = x.shape
    BT, BD, num_warps = config or _config(B, T, D, x.dtype, backward=False)
    o = _empty(x.shape, dtype=x.dtype, device=x.device)
    hs = _empty(x.shape, dtype=x.dtype, device=x.device) if store_h and z is not None else o
    ht = _empty(B, D, dtype=torch.float32, device=x.device) if store_ht else None
    bdlru_fwd_kernel[(triton.cdiv(D, BD), B)](
        x, r, i, lam, z, h0, o, hs, ht, T, D=D, BT=BT, BD=BD,
        HAS_Z=z is not None, HAS_H0=h0 is not None, STORE_H=store_h, STORE_HT=store_ht,
        num_warps=num_warps,
    )
    return o, hs, ht


def bdlru_bwd(x, r, i, lam, z, h0, hs, do, dht, config=None):
    B, T, D = x.shape
    BT, BD, num_warps = config or _config(B, T, D, x.dtype, backward=True)
    dx, dr, di = (_empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(3))
    dz = _empty(x.shape, dtype=x.dtype, device=x.device) if z is not None else None
    dlam = _empty(B, D, dtype=torch.float32, device=x.device)  # per-sequence partial sums
    dh0 = _empty(B, D, dtype=torch.float32, device=x.device) if h0 is not None else None
    bdlru_bwd_kernel[(triton.cdiv(D, BD), B)](
        x, r, i, lam, z, h0, hs, do, dht, dx, dr, di, dz, dlam, dh0, T, D=D, BT=BT, BD=BD,
        HAS_Z=z is not None, HAS_H0=h0 is not None, HAS_DHT=dht is not None,
        num_warps=num_warps,
    )
    return dx, dr, di, dlam.sum(0), dz, dh0


class FusedRecurrentBDLRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, i, lam, z, h0, return_state):
        x, r, i, lam = (t.contiguous() for t in (x, r, i, lam))
        z = z.contiguous() if z is not None else None
        h0 = h0.contiguous() if h0 is not None else None
        needs_grad = any(ctx.needs_input_grad[:6])
        o, hs, ht = bdlru_fwd(x, r, i, lam, z, h0, store_h=needs_grad, store_ht=return_state)
        if needs_grad:
            ctx.save_for_backward(x, r, i, lam, z, h0, hs)
        return (o, ht) if return_state else o

    @staticmethod
    def backward(ctx, do, dht=None):
        x, r, i, lam, z, h0, hs = ctx.saved_tensors
        dx, dr, di, dlam, dz, dh0 = bdlru_bwd(x, r, i, lam, z, h0, hs, do.contiguous(), dht)
        dh0 = dh0.to(h0.dtype) if dh0 is not None else None
        return dx, dr, di, dlam.to(lam.dtype), dz, dh0, None


def fused_recurrent_bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """BD-LRU on CUDA tensors, one Triton pass each way; same contract as `kernels.bdlru`.

    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). Returns h * silu(z) (or h) in
    the input dtype, and with return_state the final state h_T (B, D) in float32.
    """
    check_inputs(x, r, i, lam, z, h0)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused_recurrent_bdlru needs CUDA tensors (or TRITON_INTERPRET=1); use kernels.bdlru")
    return FusedRecurrentBDLRUFunction.apply(x, r, i, lam, z, h0, return_state)
