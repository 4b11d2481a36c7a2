"""Fused BD-LRU in Triton: gates, scan and output gate in one pass, forward and backward.

Each program owns one (batch, chunk of T, channel block) and walks its chunk in tiles of BT rows: a tile's
loads are all in flight at once and the scan inside the tile is an associative scan, so the walk costs
CT/BT dependent steps, not CT. Here a chunk is the whole sequence; `chunk.py` launches the same kernels with
LOOKBACK and many chunks: each program first walks its chunk to compose the chunk's map, takes the state
entering the chunk from the maps its predecessors publish (`_carry_in`), then walks it again as here. A
direction stays one launch; the second walk re-reads a chunk the first has just brought into L2.

Bytes decide the speed, so the forward saves no h: only the state before each tile (T/BT rows in float32).
The backward re-reads x, r and i (it needs them for the gates anyway) and rebuilds h inside the tile from
that checkpoint. Both h_{t-1} and the reverse carry dh_{t+1} are exclusive scans; scanning the pair
(all elements, all but the last) gets them without shifted loads.
"""

import torch
import triton
import triton.language as tl

from kernels.bdlru.naive import check_inputs
from kernels.device import check_device, empty, interpreting

# Tests set this to fill every output with NaN before the launch, so an element the kernel skips fails.
POISON_OUTPUTS = False
# Tests set this so that chunks publish only their own maps, never the state after them: every look-back
# then walks back to the first chunk, window by window, which the interpreter's in-order programs never need.
PUBLISH_STATES = True


@triton.jit
def _linear_combine(a1, h1, a2, h2):
    # (a1, h1) precedes (a2, h2) in scan order; composing h -> a1*h + h1 then h -> a2*h + h2
    return a1 * a2, a2 * h1 + h2


@triton.jit
def _linear_combine_excl(a1, h1, ap1, hp1, a2, h2, ap2, hp2):
    # (ap, hp) is the composition of every element but the last: the exclusive scan, shift-free
    return a1 * a2, a2 * h1 + h2, a1 * ap2, ap2 * h1 + hp2


@triton.jit
def _row(v, o_t, at):
    # row `at` of a (rows, BD) block, as (BD,)
    return tl.sum(tl.where(o_t[:, None] == at, v, 0.0), axis=0)


@triton.jit
def _softplus(v):
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit
def _load_tile(x, r, i, z, rows, cols, sx, sr, si, sz, m, HAS_Z: tl.constexpr):
    # (rows, cols) of x, r, i and z, each with its own row stride: r, i and z may be views into the wider
    # outputs of the projections that made them (a chunk of the last dim), read in place instead of copied.
    # In the input dtype: a prefetched tile is converted when its turn comes, so nothing waits on its loads
    b_x = tl.load(x + rows[:, None] * sx + cols[None, :], mask=m, other=0.0)
    b_r = tl.load(r + rows[:, None] * sr + cols[None, :], mask=m, other=0.0)
    b_i = tl.load(i + rows[:, None] * si + cols[None, :], mask=m, other=0.0)
    if HAS_Z:
        b_z = tl.load(z + rows[:, None] * sz + cols[None, :], mask=m, other=0.0)
    else:
        b_z = b_x  # never read
    return b_x, b_r, b_i, b_z


@triton.jit
def _f32(b_x, b_r, b_i, b_z):
    return b_x.to(tl.float32), b_r.to(tl.float32), b_i.to(tl.float32), b_z.to(tl.float32)


@triton.jit
def _channels(i_d, BD: tl.constexpr, VEC: tl.constexpr):
    """The program's BD channels. VEC > 0 tells the compiler to give each thread VEC adjacent channels, so a
    tile's lanes all run along channels, each thread holds every row of its channels and the scans over T
    stay in its registers, without shuffles between lanes. VEC = 0 leaves the layout to the compiler."""
    o_d = i_d * BD + tl.arange(0, BD)
    if VEC > 0:
        o_d = tl.max_contiguous(o_d, VEC)
    return o_d


@triton.jit
def _batch_start(x, r, i, i_b, sx_b, sr_b, si_b):
    return x + i_b * sx_b, r + i_b * sr_b, i + i_b * si_b


# A published map (a, h) is one int64: a's bits high, h's low. a >= 0, so the sign bit of the high word is
# free and marks "published"; the buffer starts at zero. Reading the value and its flag is one load, so no
# fence orders a separate flag, and a NaN gate cannot look unpublished and hang the wait.
_PUBLISHED_IDENTITY = tl.constexpr(-0x4080000000000000)  # (a = 1.0, h = 0.0) with the flag: what masked rows read


@triton.jit
def _pack(a, h):
    hi = (a.to(tl.int32, bitcast=True).to(tl.int64) & 0x7FFFFFFF) | 0x80000000
    return (hi << 32) | (h.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _unpack(v):
    a = ((v >> 32) & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return a, (v & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _program(status, n_c, D: tl.constexpr, BD: tl.constexpr, LOOKBACK: tl.constexpr, REVERSE: tl.constexpr):
    """(channel block, chunk, batch) of this program. Without look-back, the launch grid's. With it, a ticket
    taken in the order programs start, earliest chunks in scan order first: a program then only waits on
    programs already running, whatever order the GPU launches them in."""
    if LOOKBACK:
        n_d = tl.cdiv(D, BD)
        per_chunk = tl.num_programs(0) // n_c
        tid = tl.atomic_add(status + per_chunk // n_d * n_c * D, 1)  # the counter after the (B, n_c, D) maps
        i_d, i_c, i_b = tid % n_d, tid // per_chunk, tid % per_chunk // n_d
        if REVERSE:
            i_c = n_c - 1 - i_c
    else:  # one chunk
        i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    return i_d, i_c, i_b


@triton.jit
def _publish(status, i_b, i_c, n_c, o_d, m_d, a, h, D: tl.constexpr):
    tl.atomic_xchg(status + (i_b * n_c + i_c) * D + o_d, _pack(a, h), mask=m_d, sem="release")


@triton.jit
def _carry_in(status, i_b, i_c, n_c, o_d, m_d, a, h, h_init,
              D: tl.constexpr, W: tl.constexpr, REVERSE: tl.constexpr):
    """Decoupled look-back. Publish this chunk's map h -> a h + h (its scan from zero), then return the state
    entering the chunk: h_init for the first chunk in scan order, else the predecessors' maps composed, nearest
    first, W at a time, until the composition no longer depends on the past (a == 0).

    A chunk whose carry is known republishes its map as the constant (0, state at its end) (`_publish`), and
    the first chunk publishes (0, h + a h_init) at once, so the walk back ends at the nearest such chunk."""
    first = (i_c == n_c - 1) if REVERSE else (i_c == 0)
    _publish(status, i_b, i_c, n_c, o_d, m_d, tl.where(first, 0.0, a), h + a * h_init, D)
    n_pred = (n_c - 1 - i_c) if REVERSE else i_c
    o_w = tl.arange(0, W)
    acc_a, acc_h = tl.where(m_d, 1.0, 0.0), tl.zeros_like(h)  # the maps composed so far; padded channels done
    k = 0
    while (tl.max(acc_a) > 0.0) & (k < n_pred):
        p = (i_c + 1 + k + o_w) if REVERSE else (i_c - k - W + o_w)  # the next W predecessors
        m = ((p < n_c) if REVERSE else (p >= 0))[:, None] & m_d[None, :]
        ptr = status + (i_b * n_c + p[:, None]) * D + o_d[None, :]  # (W, BD)
        v = tl.load(ptr, mask=m, other=_PUBLISHED_IDENTITY, volatile=True)
        while tl.max(v) >= 0:  # some predecessor has not published yet: poll with atomics, which no
            # compiler pass hoists out of the loop as it may a load
            v = tl.where(v >= 0, tl.atomic_add(ptr, 0, mask=m & (v >= 0), sem="acquire"), v)
        pa, ph = _unpack(v)
        A, H = tl.associative_scan((pa, ph), 0, _linear_combine, reverse=REVERSE)
        end = 0 if REVERSE else W - 1  # the window's whole map
        acc_a, acc_h = _linear_combine(_row(A, o_w, end), _row(H, o_w, end), acc_a, acc_h)
        k += W
    return tl.where(first, h_init, acc_h)


@triton.jit
def _sigmoid(v, FAST: tl.constexpr):
    """FAST: 0.5 tanh(v / 2) + 0.5, one special-function instruction instead of ex2 and rcp: the bf16 backward
    is bound by such maths, not by its bytes (benchmarks/RESULTS.md, session 8). tanh.approx's error, under
    2^-10, is below the rounding that bf16 inputs already carry (2^-8); float32 inputs keep the exact form."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * v], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 * t + 0.5
    return tl.sigmoid(v)


@triton.jit
def _decay(b_r, sp, m, FAST: tl.constexpr):
    """(a, sigmoid(r)); padded rows get a = 1, so they pass the state (or q) through unchanged."""
    sr = _sigmoid(b_r, FAST)
    return tl.where(m, tl.exp(-sp[None, :] * sr), 1.0), sr


@triton.jit
def _fwd_gates(b_x, b_r, b_i, sp, m, FAST: tl.constexpr):
    # padded rows get b*x = 0 as well, so a tile's last row carries the state past them
    a, _ = _decay(b_r, sp, m, FAST)
    return a, tl.sqrt(1.0 - a * a + 1e-8) * _sigmoid(b_i, FAST) * b_x


@triton.jit(do_not_specialize=["T", "CT"])
def bdlru_fwd_kernel(
    x, r, i, lam, z, h0, o, ckpt, ht, status,
    sx_b, sx_t, sr_b, sr_t, si_b, si_t, sz_b, sz_t,
    T, CT,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STORE_CKPT: tl.constexpr, STORE_HT: tl.constexpr,
    LOOKBACK: tl.constexpr, PUBLISH_STATE: tl.constexpr, FAST: tl.constexpr, VEC: tl.constexpr,
):
    n_c = tl.cdiv(T, CT)
    i_d, i_c, i_b = _program(status, n_c, D, BD, LOOKBACK, False)
    x, r, i = _batch_start(x, r, i, i_b, sx_b, sr_b, si_b)
    if HAS_Z:
        z += i_b * sz_b
    o_d = _channels(i_d, BD, VEC)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    sp = _softplus(tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32))  # (BD,)
    h = tl.zeros([BD], dtype=tl.float32)
    if HAS_H0:
        h = tl.where(i_c == 0, tl.load(h0 + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32), 0.0)
    base = i_b * T * D
    c_end = tl.minimum(i_c * CT + CT, T)
    if LOOKBACK:  # a first walk composes the chunk's map, then the look-back gives the state entering it
        acc_a, acc_h = tl.full([BD], 1.0, tl.float32), tl.zeros([BD], dtype=tl.float32)
        for s in range(i_c * CT, c_end, BT):
            m = ((s + o_t) < c_end)[:, None] & m_d[None, :]
            b_x, b_r, b_i, _ = _f32(*_load_tile(x, r, i, z, s + o_t, o_d, sx_t, sr_t, si_t, sz_t, m, False))
            A, H = tl.associative_scan(_fwd_gates(b_x, b_r, b_i, sp, m, FAST), 0, _linear_combine)
            acc_a, acc_h = _linear_combine(acc_a, acc_h, _row(A, o_t, BT - 1), _row(H, o_t, BT - 1))
        h = _carry_in(status, i_b, i_c, n_c, o_d, m_d, acc_a, acc_h, h, D, W, False)
        if PUBLISH_STATE:  # the state after this chunk, for the chunks still looking back
            _publish(status, i_b, i_c, n_c, o_d, m_d, tl.zeros_like(h), acc_h + acc_a * h, D)
    t = i_c * CT + o_t
    m = (t < c_end)[:, None] & m_d[None, :]
    off = base + t[:, None] * D + o_d[None, :]  # (BT, BD) of the output, which is contiguous
    l_x, l_r, l_i, l_z = _load_tile(x, r, i, z, t, o_d, sx_t, sr_t, si_t, sz_t, m, HAS_Z)
    for s in range(i_c * CT, c_end, BT):
        b_x, b_r, b_i, b_z = _f32(l_x, l_r, l_i, l_z)
        # the next tile's loads go out before this tile's maths: two tiles in flight per program
        n_m = ((s + BT + o_t) < c_end)[:, None] & m_d[None, :]
        n_x, n_r, n_i, n_z = _load_tile(x, r, i, z, s + BT + o_t, o_d, sx_t, sr_t, si_t, sz_t, n_m, HAS_Z)
        if STORE_CKPT:  # (B, cdiv(T, BT), D): the state before this tile
            tl.store(ckpt + (i_b * tl.cdiv(T, BT) + s // BT) * D + o_d, h, mask=m_d)
        A, H = tl.associative_scan(_fwd_gates(b_x, b_r, b_i, sp, m, FAST), 0, _linear_combine)
        H = H + A * h[None, :]
        h = _row(H, o_t, BT - 1)
        if HAS_Z:
            H = H * b_z * _sigmoid(b_z, FAST)
        tl.store(o + off, H.to(o.dtype.element_ty), mask=m)
        l_x, l_r, l_i, l_z, m, off = n_x, n_r, n_i, n_z, n_m, off + BT * D
    if STORE_HT:
        if i_c == n_c - 1:
            tl.store(ht + i_b * D + o_d, h, mask=m_d)


@triton.jit(do_not_specialize=["T", "CT"])
def bdlru_bwd_kernel(
    x, r, i, lam, z, ckpt, do, dht, dx, dr, di, dz, dlam, dq0, status,
    sx_b, sx_t, sr_b, sr_t, si_b, si_t, sz_b, sz_t,
    T, CT,
    D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DQ0: tl.constexpr, LOOKBACK: tl.constexpr,
    PUBLISH_STATE: tl.constexpr, FAST: tl.constexpr, VEC: tl.constexpr,
):
    n_c = tl.cdiv(T, CT)
    i_d, i_c, i_b = _program(status, n_c, D, BD, LOOKBACK, True)
    x, r, i = _batch_start(x, r, i, i_b, sx_b, sr_b, si_b)
    if HAS_Z:
        z += i_b * sz_b
    o_d = _channels(i_d, BD, VEC)
    m_d = o_d < D
    o_t = tl.arange(0, BT)
    b_lam = tl.load(lam + o_d, mask=m_d, other=0.0).to(tl.float32)
    sp = _softplus(b_lam)
    # q = a_t * dL/dh_t, the gradient that reaches h_{t-1} through the recurrence; past T it is dL/dh_T
    # itself, past a chunk's end the carry from the later chunks
    q = tl.zeros([BD], dtype=tl.float32)
    if HAS_DHT:
        q = tl.where(i_c == n_c - 1, tl.load(dht + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32), 0.0)
    dlam_acc = tl.zeros([BD], dtype=tl.float32)
    base = i_b * T * D
    c_start = i_c * CT
    n_t = tl.cdiv(tl.minimum(c_start + CT, T) - c_start, BT)
    s = c_start + (n_t - 1) * BT  # tiles from the chunk's end
    m = ((s + o_t) < T)[:, None] & m_d[None, :]
    off = base + (s + o_t)[:, None] * D + o_d[None, :]  # (BT, BD) of do and the gradients, contiguous
    if LOOKBACK:  # a first walk composes the chunk's map of q from r, z and do, then the look-back
        acc_a, acc_h = tl.full([BD], 1.0, tl.float32), tl.zeros([BD], dtype=tl.float32)
        for k in range(n_t):
            p_m = ((s - k * BT + o_t) < T)[:, None] & m_d[None, :]
            _, b_r, _, b_z = _f32(*_load_tile(x, r, i, z, s - k * BT + o_t, o_d, sx_t, sr_t, si_t, sz_t, p_m, HAS_Z))
            a, _ = _decay(b_r, sp, p_m, FAST)
            g = tl.load(do + off - k * BT * D, mask=p_m, other=0.0).to(tl.float32)
            if HAS_Z:
                g = g * b_z * _sigmoid(b_z, FAST)
            QA, Q = tl.associative_scan((a, a * g), 0, _linear_combine, reverse=True)
            acc_a, acc_h = _linear_combine(acc_a, acc_h, _row(QA, o_t, 0), _row(Q, o_t, 0))
        q = _carry_in(status, i_b, i_c, n_c, o_d, m_d, acc_a, acc_h, q, D, W, True)
        if PUBLISH_STATE:  # q at this chunk's start, for the chunks still looking back
            _publish(status, i_b, i_c, n_c, o_d, m_d, tl.zeros_like(q), acc_h + acc_a * q, D)
    o_ck = (i_b * tl.cdiv(T, BT) + s // BT) * D + o_d  # the state before the tile
    l_x, l_r, l_i, l_z = _load_tile(x, r, i, z, s + o_t, o_d, sx_t, sr_t, si_t, sz_t, m, HAS_Z)
    l_do = tl.load(do + off, mask=m, other=0.0)
    h = tl.load(ckpt + o_ck, mask=m_d, other=0.0)
    for _ in range(n_t):
        # the previous tile's loads go out before this tile's maths: two tiles in flight per program
        n_m = ((s - BT + o_t) >= c_start)[:, None] & m_d[None, :]
        n_x, n_r, n_i, n_z = _load_tile(x, r, i, z, s - BT + o_t, o_d, sx_t, sr_t, si_t, sz_t, n_m, HAS_Z)
        n_do = tl.load(do + off - BT * D, mask=n_m, other=0.0)
        n_h = tl.load(ckpt + o_ck - D, mask=m_d & (s - BT + 0 * o_d >= c_start), other=0.0)
        b_x, b_r, b_i, b_z = _f32(l_x, l_r, l_i, l_z)
        b_do = l_do.to(tl.float32)
        a, sr = _decay(b_r, sp, m, FAST)
        inv_sq = tl.math.rsqrt(1.0 - a * a + 1e-8)  # one rsqrt for sqrt(1 - a^2) and the division by it
        sq = (1.0 - a * a + 1e-8) * inv_sq
        si = _sigmoid(b_i, FAST)
        one, zero = tl.full([BT, BD], 1.0, tl.float32), tl.zeros([BT, BD], dtype=tl.float32)
        A, H, Ap, Hp = tl.associative_scan((a, sq * si * b_x, one, zero), 0, _linear_combine_excl)
        h_prev = Hp + Ap * h[None, :]  # (BT, BD) h_{t-1}
        if HAS_Z:
            sz = _sigmoid(b_z, FAST)
            g = b_do * b_z * sz
            b_h = H + A * h[None, :]
            tl.store(dz + off, (b_do * b_h * sz * (1.0 + b_z * (1.0 - sz))).to(dz.dtype.element_ty), mask=m)
        else:
            g = b_do
        # dh_t = g_t + q_{t+1} and q_t = a_t dh_t: a reverse scan of (a, a g) whose exclusive part is q_{t+1}
        QA, Q, QAp, Qp = tl.associative_scan((a, a * g, one, zero), 0, _linear_combine_excl, reverse=True)
        dh = g + Qp + QAp * q[None, :]
        q = _row(Q + QA * q[None, :], o_t, 0)
        db = dh * b_x
        # total derivative through a, including b = sqrt(1 - a^2 + eps) * sigmoid(i)
        dA = dh * h_prev - db * si * a * inv_sq
        tl.store(dx + off, (dh * sq * si).to(dx.dtype.element_ty), mask=m)
        tl.store(dr + off, (dA * (-sp[None, :] * a) * sr * (1.0 - sr)).to(dr.dtype.element_ty), mask=m)
        tl.store(di + off, (db * sq * si * (1.0 - si)).to(di.dtype.element_ty), mask=m)
        dlam_acc += tl.sum(tl.where(m, dA * (-sr * a), 0.0), axis=0)
        l_x, l_r, l_i, l_z, l_do, h, m = n_x, n_r, n_i, n_z, n_do, n_h, n_m
        s, off, o_ck = s - BT, off - BT * D, o_ck - D
    tl.store(dlam + (i_b * n_c + i_c) * D + o_d, dlam_acc * tl.sigmoid(b_lam), mask=m_d)
    if STORE_DQ0:
        if i_c == 0:
            tl.store(dq0 + i_b * D + o_d, q, mask=m_d)


# (BT, (BD, num_warps) forward, (BD, num_warps) backward) from `benchmarks/bdlru_kernel.py --sweep` on an
# H100, the best fwd + bwd sum at (2048, 200, 128) that also holds at (512, 1024, 128); BT is the checkpoint
# interval, so both directions share it. bf16 halves the bytes but not the maths, so it takes wider channel
# blocks: more elements a thread to overlap that maths with. Its forward is the best one writing the
# checkpoint, as training runs it: 2 warps take 0.217 ms there against 1 warp's 0.239, and give back 0.007
# ms of the forward without it (0.197 against 0.190).
TILES = {torch.float32: (4, (64, 1), (64, 1)), torch.bfloat16: (4, (128, 2), (128, 1))}
# too few sequences to fill the GPU: narrow channel blocks make more programs (`chunk.py` makes more still)
TILES_FEW_PROGRAMS = (32, (8, 1), (8, 1))


def _fit(tiles, T, D):
    BT, *dirs = tiles
    return min(BT, triton.next_power_of_2(T)), *((min(bd, triton.next_power_of_2(D)), w) for bd, w in dirs)


def _config(B, T, D, dtype):
    """BT, then (BD, num_warps) for the forward and for the backward."""
    return _fit(TILES_FEW_PROGRAMS if B * triton.cdiv(D, 32) < 512 else TILES[dtype], T, D)


LOOKBACK_WINDOW = 16  # predecessors read at once; the walk back rarely needs a second window


def _grid(B, T, D, BT, BD, chunk, device):
    """(grid, CT, W, status): one program per (channel block, batch) walking all of T, or, given a chunk
    length, one per (channel block, chunk, batch) with the zeroed maps and start counter they share."""
    if chunk is None:
        return (triton.cdiv(D, BD), 1, B), T, 1, None
    if chunk % BT:
        raise ValueError(f"chunk length {chunk} is not a multiple of the tile's {BT} rows")
    n_c = triton.cdiv(T, chunk)
    status = torch.zeros(B * n_c * D + 1, dtype=torch.int64, device=device)
    return (triton.cdiv(D, BD) * n_c * B,), chunk, min(LOOKBACK_WINDOW, triton.next_power_of_2(n_c)), status


def _fast_gates(x):
    # the interpreter runs no inline PTX
    return x.dtype == torch.bfloat16 and not interpreting()


def _vec(BT, BD, num_warps):
    """`_channels`' VEC: rows held in registers when each thread then gets at least 2 adjacent channels and
    at most 16 elements of a tile. With one channel a thread, the compiler's own layout loads wider vectors
    along rows; past 16 elements, registers run out. From the tile sweep (benchmarks/RESULTS.md, session 10):
    the bf16 backward at (2048, 200, 128) takes 0.39 ms with 4 x 128 tiles held so, 0.60 ms without."""
    vec = BD // (32 * num_warps)
    return vec if vec >= 2 and BT * vec <= 16 else 0


def bdlru_fwd(x, r, i, lam, z, h0, store_ckpt, store_ht, BT, BD, num_warps, chunk=None):
    """out (B, T, D), the state before every BT-row tile (B, cdiv(T, BT), D) and h_T (B, D)."""
    B, T, D = x.shape
    o = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS)
    ckpt = empty((B, triton.cdiv(T, BT), D), torch.float32, x.device, POISON_OUTPUTS) if store_ckpt else None
    ht = empty((B, D), torch.float32, x.device, POISON_OUTPUTS) if store_ht else None
    grid, CT, W, status = _grid(B, T, D, BT, BD, chunk, x.device)
    bdlru_fwd_kernel[grid](
        x, r, i, lam, z, h0, o, ckpt, ht, status, *_strides(x, r, i, z), T, CT, D=D, BT=BT, BD=BD, W=W,
        HAS_Z=z is not None, HAS_H0=h0 is not None, STORE_CKPT=store_ckpt, STORE_HT=store_ht,
        LOOKBACK=chunk is not None, PUBLISH_STATE=PUBLISH_STATES, FAST=_fast_gates(x), VEC=_vec(BT, BD, num_warps),
        num_warps=num_warps,
    )
    return o, ckpt, ht


def bdlru_bwd(x, r, i, lam, z, ckpt, do, dht, store_dq0, BT, BD, num_warps, chunk=None):
    """dx, dr, di, dlam, dz and dL/dh0 from the tile checkpoints and dL/dh_T (or None)."""
    B, T, D = x.shape
    dx, dr, di = (empty(x.shape, x.dtype, x.device, POISON_OUTPUTS) for _ in range(3))
    dz = empty(x.shape, x.dtype, x.device, POISON_OUTPUTS) if z is not None else None
    grid, CT, W, status = _grid(B, T, D, BT, BD, chunk, x.device)
    dlam = empty((B * triton.cdiv(T, CT), D), torch.float32, x.device, POISON_OUTPUTS)  # per-program partial sums
    dq0 = empty((B, D), torch.float32, x.device, POISON_OUTPUTS) if store_dq0 else None
    bdlru_bwd_kernel[grid](
        x, r, i, lam, z, ckpt, do, dht, dx, dr, di, dz, dlam, dq0, status, *_strides(x, r, i, z), T, CT,
        D=D, BT=BT, BD=BD, W=W, HAS_Z=z is not None, HAS_DHT=dht is not None, STORE_DQ0=store_dq0,
        LOOKBACK=chunk is not None, PUBLISH_STATE=PUBLISH_STATES, FAST=_fast_gates(x), VEC=_vec(BT, BD, num_warps),
        num_warps=num_warps,
    )
    return dx, dr, di, dlam.sum(0), dz, dq0


def _contiguous(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


def _kernel_inputs(x, r, i, lam, z, h0):
    """(x, r, i, z, lam, h0) as the kernels read them: x, r, i and z with any batch and row strides but
    adjacent channels (else copied), lam and h0 contiguous."""
    rows = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, r, i, z)]
    return *rows, *_contiguous(lam, h0)


def _strides(x, r, i, z):
    """(batch, row) strides of x, r, i and z, in the kernels' argument order; z's are 0 when it is absent."""
    return [s for t in (x, r, i, z) for s in ((t.stride(0), t.stride(1)) if t is not None else (0, 0))]


class BDLRUFunction(torch.autograd.Function):
    """Autograd of both launchers: config = (BT, (BD, num_warps) forward, (BD, num_warps) backward); given
    chunk lengths (rows forward and backward, multiples of BT) a program per chunk (`chunk.py`), else one per
    channel block walking all of T. recording: grad mode at the call, since ctx.needs_input_grad follows
    requires_grad alone: under no_grad, inputs that require grad would have the forward write a checkpoint
    nothing reads."""

    @staticmethod
    def forward(ctx, x, r, i, lam, z, h0, return_state, config, chunk, recording):
        x, r, i, z, lam, h0 = _kernel_inputs(x, r, i, lam, z, h0)
        BT, fwd, bwd = config
        needs_grad = recording and any(ctx.needs_input_grad[:6])
        o, ckpt, ht = bdlru_fwd(x, r, i, lam, z, h0, needs_grad, return_state, BT, *fwd,
                                 chunk=chunk and chunk[0])
        if needs_grad:
            ctx.save_for_backward(x, r, i, lam, z, ckpt)
            ctx.config, ctx.chunk = (BT, *bwd), chunk and chunk[1]
            ctx.h0_dtype = h0.dtype if h0 is not None else None
        return (o, ht) if return_state else o

    @staticmethod
    def backward(ctx, do, dht=None):
        x, r, i, lam, z, ckpt = ctx.saved_tensors
        do, dht = _contiguous(do, dht)
        dx, dr, di, dlam, dz, dh0 = bdlru_bwd(x, r, i, lam, z, ckpt, do, dht, ctx.h0_dtype is not None, *ctx.config,
                                              chunk=ctx.chunk)
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dx, dr, di, dlam.to(lam.dtype), dz, dh0, None, None, None, None


def fused_recurrent_bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """BD-LRU on CUDA tensors, one Triton pass each way; same contract as `kernels.bdlru`.

    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). Returns h * silu(z) (or h) in
    the input dtype, and with return_state the final state h_T (B, D) in float32.
    """
    check_inputs(x, r, i, lam, z, h0)
    check_device(x, "fused_recurrent_bdlru", "kernels.bdlru")
    return BDLRUFunction.apply(x, r, i, lam, z, h0, return_state, _config(*x.shape, x.dtype), None,
                               torch.is_grad_enabled())
