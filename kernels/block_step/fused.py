"""One RecBLR block's step in Triton: every layer of the block for a block of users in one launch.

Serving advances each user by one event, so a block's step is a chain of (users x a few hundred) products and
element-wise maths: in PyTorch about twenty launches a block, each too small to fill the GPU, which a CUDA graph
replays back to back. Here a program owns a few users from the block's input to its output: in_proj, the conv over
the window, SiLU, the gate projection, the BD-LRU update, the output gate, out_proj, residual and LayerNorm, then
the PFFN and its LayerNorm (benchmarks/RESULTS.md, "Inference", session 9: 2.5-3.2x the composition's GPU time).
The model's first block also looks up its users' items and applies the embedding LayerNorm, and every block
writes the state in place for the active users only, so a served step needs no other launch before the ranking
(session 12).

Each product's output rows stay in registers; its left operand is read BK columns at a time from memory (the
input itself, or the program's rows of a scratch buffer it wrote before a barrier), and so is each weight, as
stored, so no operand is held whole: held whole, a (128, 128) tile replicated across the warps spilled. The
weights are read by every program, from L2 after the first. The padded sizes are bounded (`fits`, the paper's
D = 64 block at the limit); larger blocks step in PyTorch.

Precision: float32 in, float32 out; the products run as "tf32x3" (see kernels/score_topk/fused.py), within
float32 rounding of the reference's cuBLAS products.
"""
import torch
import triton
import triton.language as tl

from kernels.bdlru.fused_recurrent import _fwd_gates, _softplus
from kernels.block_step.naive import BlockWeights, check_inputs
from kernels.device import check_device, empty, sm_count

# Tests set this to fill every output with NaN before the launch, so an element the kernel skips fails.
POISON_OUTPUTS = False
# Users a program owns, 8 or 16 (`_users_per_program`). None: that choice; the benchmark's sweep sets a number.
USERS = None
BLOCK_K = 64
NUM_WARPS = 8
MAX_TILE = 128 * 128  # padded (out, in) of the largest product: the paper's D = 64 gates and PFFN, all measured
PRECISION = "tf32x3"


@triton.jit
def _linear(a, row, m_row, a_cols, w, n_out, n_in, OUT: tl.constexpr, IN: tl.constexpr, BK: tl.constexpr,
            PRECISION: tl.constexpr, PAIR: tl.constexpr):
    # a[row, :n_in] @ w[:n_out, :n_in].T -> (BB, OUT), zero past n_out; with PAIR also the next n_out rows of w
    # (else zeros), so in_proj's x and z halves, and the gates' r and i, share each load of a and one loop.
    # a is row-major with a_cols columns, w with n_in. Both are read BK columns at a time: no operand is held whole
    o = tl.arange(0, OUT)
    acc = tl.zeros([row.shape[0], OUT], dtype=tl.float32)
    acc_pair = tl.zeros([row.shape[0], OUT], dtype=tl.float32)
    for k0 in tl.range(0, IN, BK):
        k = k0 + tl.arange(0, BK)
        b_a = tl.load(a + row * a_cols + k[None, :], mask=m_row & (k < n_in)[None, :], other=0.0).to(tl.float32)
        # (OUT, BK) as stored, rows of BK contiguous floats: vector loads, a few addresses a thread
        at, m_w = o[:, None] * n_in + k[None, :], (o[:, None] < n_out) & (k < n_in)[None, :]
        b_w = tl.load(w + at, mask=m_w, other=0.0).to(tl.float32)
        acc = tl.dot(b_a, tl.trans(b_w), acc, input_precision=PRECISION)
        if PAIR:
            b_w = tl.load(w + n_out * n_in + at, mask=m_w, other=0.0).to(tl.float32)
            acc_pair = tl.dot(b_a, tl.trans(b_w), acc_pair, input_precision=PRECISION)
    return acc, acc_pair


@triton.jit
def _vector(p, start, n, SIZE: tl.constexpr):
    o = tl.arange(0, SIZE)
    return tl.load(p + start + o, mask=o < n, other=0.0).to(tl.float32)  # (SIZE,), zero past n


@triton.jit
def _silu(v):
    return v * tl.sigmoid(v)


@triton.jit
def _layer_norm(v, weight, bias, n, eps, SIZE: tl.constexpr):
    # over the first n columns of v (BB, SIZE), whose padding columns are zero, and stay zero
    m = tl.arange(0, SIZE) < n
    mean = tl.sum(v, axis=1) / n
    c = tl.where(m[None, :], v - mean[:, None], 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / n + eps)
    return c * inv_std[:, None] * _vector(weight, 0, n, SIZE)[None, :] + _vector(bias, 0, n, SIZE)[None, :]


@triton.jit
def block_step_kernel(
    u, rows, window, h, active, out, scratch, ln0_w, ln0_b,
    w_in, conv_w, conv_b, w_gates, b_gates, lam, w_out, ln1_w, ln1_b, w_ffn1, b_ffn1, w_ffn2, b_ffn2, ln2_w, ln2_b,
    B, eps, D: tl.constexpr, E: tl.constexpr, F: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_LN_IN: tl.constexpr,
    HAS_CONV: tl.constexpr, K: tl.constexpr, HAS_FFN: tl.constexpr, HAS_ACTIVE: tl.constexpr, BB: tl.constexpr,
    BK: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, FP: tl.constexpr, PRECISION: tl.constexpr,
    USERS: tl.constexpr,
):
    # BB >= USERS rows, tl.dot's minimum of 16 where a program owns fewer users: the rows past them are masked
    o_b = tl.program_id(0) * USERS + tl.arange(0, BB)
    o_d, o_e = tl.arange(0, DP), tl.arange(0, EP)
    m_b = (o_b < B) & (tl.arange(0, BB) < USERS)
    row, m_row = o_b[:, None].to(tl.int64), m_b[:, None]
    m_be = m_row & (o_e < E)[None, :]
    # the state (window, h) is read, then written in place where the user is active; every row's output is made
    m_state = m_be
    if HAS_ACTIVE:
        m_state &= (tl.load(active + o_b, mask=m_b, other=0) != 0)[:, None]
    m_bd = m_row & (o_d < D)[None, :]
    # a product's left operand is read from memory BK columns at a time: u is there already, the others are
    # written to this program's rows of scratch (B, S) first, where every thread of the program sees them after
    # a barrier: xs at 0, y at EP, v at 2 EP, f at 2 EP + DP, the input at 2 EP + DP + FP when made here
    S: tl.constexpr = 2 * EP + 2 * DP + FP
    if HAS_ROWS or HAS_LN_IN:  # the model's embedding lookup and LayerNorm, folded into its first block
        at_u = tl.load(rows + o_b, mask=m_b, other=0).to(tl.int64)[:, None] * D if HAS_ROWS else row * D
        u_in = tl.load(u + at_u + o_d[None, :], mask=m_bd, other=0.0)
        if HAS_LN_IN:
            u_in = _layer_norm(u_in, ln0_w, ln0_b, D, eps, DP)
        src, src_cols = scratch + 2 * EP + DP + FP, S
        tl.store(src + row * S + o_d[None, :], u_in, mask=m_row)
        tl.debug_barrier()
    else:
        src, src_cols = u, D
    x, z = _linear(src, row, m_row, src_cols, w_in, E, D, EP, DP, BK, PRECISION, True)  # (BB, EP) each, 0 past E
    if HAS_CONV:
        # window (B, E, K - 1) of pre-conv inputs, oldest first; taps (E, K) weigh them, then x
        conv = x * tl.load(conv_w + o_e * K + K - 1, mask=o_e < E, other=0.0)[None, :] + \
            _vector(conv_b, 0, E, EP)[None, :]
        at = row * E * (K - 1) + o_e[None, :] * (K - 1)  # (BB, EP) offsets of each (user, channel) window
        # The window shifts one column left in place. Column j - 1 is overwritten by threads that may not be the
        # ones that read it (the compiler picks each tensor's layout), so each store adds 0 * its column's old
        # value: the store then waits for that read. Window values are in_proj outputs, finite, so this adds 0.
        prev = x
        for j in tl.static_range(K - 1):
            past = tl.load(window + at + j, mask=m_be, other=0.0)
            conv += past * tl.load(conv_w + o_e * K + j, mask=o_e < E, other=0.0)[None, :]
            if j > 0:
                tl.store(window + at + j - 1, past + 0.0 * prev, mask=m_state)
            prev = past
        if K > 1:
            tl.store(window + at + K - 2, x + 0.0 * prev, mask=m_state)
        x = conv
    x = _silu(x)
    tl.store(scratch + row * S + o_e[None, :], x, mask=m_row)
    tl.debug_barrier()
    r, i = _linear(scratch, row, m_row, S, w_gates, E, E, EP, EP, BK, PRECISION, True)
    r += _vector(b_gates, 0, E, EP)[None, :]
    i += _vector(b_gates, E, E, EP)[None, :]
    a, bx = _fwd_gates(x, r, i, _softplus(_vector(lam, 0, E, EP)), m_be, False)  # the BD-LRU kernel's gates
    b_h = a * tl.load(h + row * E + o_e[None, :], mask=m_be, other=0.0) + bx  # (BB, EP)
    tl.store(h + row * E + o_e[None, :], b_h, mask=m_state)
    tl.store(scratch + row * S + EP + o_e[None, :], b_h * _silu(z), mask=m_row)
    tl.debug_barrier()
    o, _ = _linear(scratch + EP, row, m_row, S, w_out, D, E, DP, EP, BK, PRECISION, False)
    v = tl.load(src + row * src_cols + o_d[None, :], mask=m_bd, other=0.0) + o
    v = _layer_norm(v, ln1_w, ln1_b, D, eps, DP)  # (BB, DP), zero past D
    if HAS_FFN:
        tl.store(scratch + row * S + 2 * EP + o_d[None, :], v, mask=m_row)
        tl.debug_barrier()
        f, _ = _linear(scratch + 2 * EP, row, m_row, S, w_ffn1, F, D, FP, DP, BK, PRECISION, False)
        tl.store(scratch + row * S + 2 * EP + DP + tl.arange(0, FP)[None, :],
                 _silu(f + _vector(b_ffn1, 0, F, FP)[None, :]), mask=m_row)
        tl.debug_barrier()
        g, _ = _linear(scratch + 2 * EP + DP, row, m_row, S, w_ffn2, D, F, DP, FP, BK, PRECISION, False)
        v = _layer_norm(v + g + _vector(b_ffn2, 0, D, DP)[None, :], ln2_w, ln2_b, D, eps, DP)
    tl.store(out + row * D + o_d[None, :], v, mask=m_bd)


def _users_per_program(B: int, device: torch.device) -> int:
    """8 while that makes at most one program per SM (registers and shared memory allow no second), else 16.

    A program's time hardly depends on its users, since it is a chain of dependent phases: on an H100 (132 SMs)
    a block steps 1,024 users in 0.0227 ms in 128 programs of 8, against 0.0264 in 64 programs of 16. Past one
    wave, fewer and fuller programs win: 4,096 users take 0.0549 ms in 256 programs of 16, 0.0836 in 512 of 8
    and 0.0654 in 128 of 32, whose 32-row products make every program slower (benchmarks/RESULTS.md,
    "Inference", session 13).
    """
    if USERS is not None:
        return USERS
    return 8 if triton.cdiv(B, 8) <= sm_count(device) else 16


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot takes no dimension under 16


def fits(w: BlockWeights) -> bool:
    """Whether every product of the block stays within MAX_TILE (out x in) once padded (the paper's D = 64 with
    E = 128 and a PFFN of 256 does, at the limit)."""
    D, E = _padded(w.in_proj.shape[1]), _padded(w.lam.shape[0])
    F = _padded(w.ffn[0].shape[0]) if w.ffn is not None else 16
    return max(D * E, E * E, D * F) <= MAX_TILE


def refusal(u, window, h, w: BlockWeights) -> str | None:
    """Why the kernel does not take these inputs (some tensor not float32, a state not contiguous, or a block over
    `fits`), else None: the one test of both `fused_block_step`, which raises it, and `kernels.block_step`, which
    then steps in PyTorch."""
    tensors = [u, window, h, w.in_proj, w.lam, w.out_proj, *w.gates, *w.ln_1, *(w.conv or ()), *(w.ffn or ()),
               *(w.ln_2 or ()), *(w.ln_in or ())]
    if any(t.dtype != torch.float32 for t in tensors):
        return "fused_block_step takes float32 inputs and weights; kernels.block_step steps others with the reference"
    if not (window.is_contiguous() and h.is_contiguous()):
        return ("fused_block_step advances a contiguous state in place; kernels.block_step steps others with the "
                "reference")
    if not fits(w):
        return (f"fused_block_step takes products up to {MAX_TILE} weights; this block (D = {w.in_proj.shape[1]}, "
                f"E = {w.lam.shape[0]}) steps with the reference")
    return None


def fused_block_step(u, window, h, w: BlockWeights, active=None, rows=None):
    """`kernels.block_step` on CUDA tensors, always through the kernel: float32 inputs and weights, blocks that
    `fits`, a contiguous state. Returns out (B, D), a new tensor, and advances window and h in place; no autograd.
    Allocations depend on the shapes alone and nothing syncs with the host, so a CUDA graph can capture it."""
    check_inputs(u, window, h, w, active, rows)
    check_device(u, "fused_block_step", "kernels.block_step")
    why = refusal(u, window, h, w)
    if why is not None:
        raise ValueError(why)
    (B, E), D = h.shape, u.shape[1]
    F = w.ffn[0].shape[0] if w.ffn is not None else 1
    K = w.conv[0].shape[1] if w.conv is not None else 1
    # the kernel reads every tensor row-major; parameters already are, so these are no copies
    u, in_proj, lam, out_proj, gates_w, gates_b, ln_1_w, ln_1_b = (t.contiguous() for t in (
        u, w.in_proj, w.lam, w.out_proj, *w.gates, *w.ln_1))
    unused = [u] * 6  # pointers the kernel never reads without their part of the block
    ln_in = [t.contiguous() for t in w.ln_in] if w.ln_in is not None else unused[:2]
    conv = [t.contiguous() for t in w.conv] if w.conv is not None else unused[:2]
    ffn = [t.contiguous() for t in (*w.ffn, *w.ln_2)] if w.ffn is not None else unused
    out = empty((B, D), torch.float32, u.device, POISON_OUTPUTS)
    DP, EP, FP = _padded(D), _padded(E), _padded(F)
    scratch = torch.empty(B, 2 * EP + 2 * DP + FP, dtype=torch.float32, device=u.device)
    users = _users_per_program(B, u.device)
    block_step_kernel[(triton.cdiv(B, users),)](
        u, u if rows is None else rows.contiguous(), window, h, u if active is None else active.contiguous(), out,
        scratch, *ln_in, in_proj, *conv, gates_w, gates_b, lam, out_proj, ln_1_w, ln_1_b, *ffn, B, w.eps, D=D, E=E, F=F,
        HAS_ROWS=rows is not None, HAS_LN_IN=w.ln_in is not None, HAS_CONV=w.conv is not None, K=K,
        HAS_FFN=w.ffn is not None, HAS_ACTIVE=active is not None, BB=max(16, users), BK=BLOCK_K, DP=DP, EP=EP,
        FP=FP, PRECISION=PRECISION, USERS=users, num_warps=NUM_WARPS,
    )
    return out
