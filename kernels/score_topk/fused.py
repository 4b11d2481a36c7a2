"""Score + top-k in Triton: each user's k best items by dot product, without writing the (B, N) scores.

Ranking B users against N items the plain way writes B x N float32 scores and reads them back for
torch.topk: at B = 1024, N = 100,000 (400 MB, a radix select over 100k columns) 1.8-1.9 ms of a 1.93 ms serving
step on an H100 (benchmarks/RESULTS.md, "Inference"). Here the scores live only in registers, in two launches:

1. `score_topk_kernel`. A program owns BLOCK_B users and a contiguous range of items. It holds the users'
   hidden block and walks its range BLOCK_N items at a time: one `tl.dot` makes the (BLOCK_B, BLOCK_N) score
   tile, which fills or is merged into a running top-k per user ((BLOCK_B, KP) values and item indices). The
   range's first tile fills the list in k rounds, each an argmax and a drop, cheaper than merge rounds with no
   list to merge into yet (session 12: the kernel 1.33x faster at 1,024 x 3,416, where every range is one
   tile). A merge round takes each row's best score left in a later tile, puts it in
   place of the row's current k-th best, and drops from the tile every score no better than the new k-th best;
   rounds go on while any row has a score left. After m items a new one beats the k-th best with chance about
   k/m on random data, so the later tiles of a range take a few rounds (as many as the block's busiest row
   needs), not k. Each program writes its k (value, index) candidates per user, unordered.
2. `select_kernel`. A program holds one user's candidates in registers (ranges x k, a few hundred, at most
   MAX_CANDIDATES; several users' when theirs fit SELECT_BLOCK) and takes the best k in k rounds, best first.
   torch.topk over the candidates and a gather of their indices took three launches and 0.031 ms of a
   0.164 ms served step (1,024 users, 3,416 items: benchmarks/RESULTS.md, "Inference", session 11).

Programs start with the user block as the fastest grid axis, so the blocks sharing a range run together: the
table is read from memory about once and from L2 by the other blocks; the hidden block is loaded once.
Enough ranges are made to give every SM a few programs; fewer, longer ranges would spend fewer first tiles.
The sizes (`_config`, `_ranges`) follow from these arguments and tl.dot's minimum shapes; a GPU sweep may move them.

Precision: bfloat16 products are exact in float32, so bfloat16 inputs take one tensor-core pass with float32
accumulation, as the reference computes them. float32 inputs take "tf32x3" (each operand split into a TF32
high part and a TF32 remainder, three tensor-core products): error near float32's, where plain TF32 rounds the
inputs to 10 mantissa bits (relative 5e-4) and would reorder near scores, which a 100k-item catalogue has
plenty of around the k-th place; "ieee" is exact too but runs the products on the CUDA cores, beside the
merge rounds that already keep them busy.

Ties: among equal scores the lower item index wins, in both launches. Scores that are NaN are never chosen.
"""
import torch
import triton
import triton.language as tl

from kernels.device import check_device, empty, interpreting, sm_count
from kernels.score_topk.naive import check_inputs

# Tests set this to fill the candidate buffers with NaN (values) and -1 (indices) before the launch, so a slot
# the kernel skips surfaces in the result.
POISON_OUTPUTS = False


@triton.jit
def _tile_scores(b_h, t, n0, end, kth, o_d, m_d, s_tn, s_td, BN: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr):
    # (BB, BN) scores of items n0.. against the hidden block, -inf where they cannot enter the list (at most the
    # k-th best so far, NaN, or past the range)
    n = n0 + tl.arange(0, BN)
    m_n = n < end
    # (BD, BN): the tile's rows of the table, transposed by the addressing; int64 as N x D may pass 2^31
    b_t = tl.load(t + n[None, :].to(tl.int64) * s_tn + o_d[:, None] * s_td, mask=m_d[:, None] & m_n[None, :],
                  other=0.0)
    if DOT_FP32:
        b_t = b_t.to(tl.float32)
    s = tl.dot(b_h, b_t, input_precision=PRECISION)  # (BB, BN) float32
    return tl.where(m_n[None, :] & (s > kth[:, None]), s, float("-inf"))


@triton.jit
def score_topk_kernel(
    h, t, cand_v, cand_i, B, N, D, ITEMS,
    s_hb, s_hd, s_tn, s_td,
    K: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_r = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_d, o_n = tl.arange(0, BD), tl.arange(0, BN)
    m_b, m_d = o_b < B, o_d < D
    # (BB, BD), zero past D and B: padded channels add nothing to a score, padded users are never stored
    b_h = tl.load(h + o_b[:, None].to(tl.int64) * s_hb + o_d[None, :] * s_hd, mask=m_b[:, None] & m_d[None, :],
                  other=0.0)
    if DOT_FP32:  # both operands of tl.dot share a dtype: one float32 operand makes both float32
        b_h = b_h.to(tl.float32)
    slot = tl.arange(0, KP)
    # the running list: slots past k hold +inf, so they are never the k-th best, never replaced nor stored
    top_v = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BB, KP], dtype=tl.float32)
    top_i = tl.zeros([BB, KP], dtype=tl.int32)
    kth = tl.full([BB], float("-inf"), dtype=tl.float32)  # each row's k-th best so far
    start = i_r * ITEMS
    end = tl.minimum(start + ITEMS, N)
    # The range's first tile fills the list: its best k in k rounds of an argmax (the first column among equal
    # scores, so the lower item) and a drop, with no list to merge into yet. A range of fewer than k items leaves
    # -inf slots, which `select_kernel` never picks.
    s = _tile_scores(b_h, t, start, end, kth, o_d, m_d, s_tn, s_td, BN, DOT_FP32, PRECISION)
    for j in range(K):
        best, col = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)  # (BB,) each
        top_v = tl.where(slot[None, :] == j, best[:, None], top_v)
        top_i = tl.where(slot[None, :] == j, start + col[:, None], top_i)
        s = tl.where(o_n[None, :] == col[:, None], float("-inf"), s)
    kth = tl.min(top_v, axis=1)
    # later tiles merge: a round puts the row's best score left in place of its k-th best
    for n0 in range(start + BN, end, BN):
        s = _tile_scores(b_h, t, n0, end, kth, o_d, m_d, s_tn, s_td, BN, DOT_FP32, PRECISION)
        best = tl.max(s, axis=1)
        while tl.max(best) > float("-inf"):
            col = tl.min(tl.where(s == best[:, None], o_n[None, :], BN), axis=1)  # (BB,) its first occurrence
            put = (slot[None, :] == tl.argmin(top_v, axis=1)[:, None]) & (best > float("-inf"))[:, None]
            top_v = tl.where(put, best[:, None], top_v)
            top_i = tl.where(put, n0 + col[:, None], top_i)
            kth = tl.min(top_v, axis=1)
            s = tl.where((o_n[None, :] == col[:, None]) | (s <= kth[:, None]), float("-inf"), s)
            best = tl.max(s, axis=1)
    # (B, ranges, K) candidates
    off = (o_b[:, None].to(tl.int64) * tl.num_programs(1) + i_r) * K + slot[None, :]
    m = m_b[:, None] & (slot[None, :] < K)
    tl.store(cand_v + off, top_v, mask=m)
    tl.store(cand_i + off, top_i, mask=m)


@triton.jit
def select_kernel(cand_v, cand_i, values, indices, active, B, C, OFFSET, K: tl.constexpr, BB: tl.constexpr,
                  BC: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    """Each of BB rows' K best of its C candidates, best first, written where the row is active, each index plus
    OFFSET: a round takes the row's best score left, the lowest item among equals, and drops that item."""
    o_b = tl.program_id(0) * BB + tl.arange(0, BB)
    o_c = tl.arange(0, BC)
    m_b = o_b < B
    if HAS_ACTIVE:
        m_b &= tl.load(active + o_b, mask=m_b, other=0) != 0
    off = o_b[:, None].to(tl.int64) * C + o_c[None, :]
    m = m_b[:, None] & (o_c < C)[None, :]
    v = tl.load(cand_v + off, mask=m, other=float("-inf"))  # (BB, BC)
    n = tl.load(cand_i + off, mask=m, other=2147483647)
    for j in range(K):
        best = tl.max(v, axis=1)  # (BB,)
        at = tl.min(tl.where(v == best[:, None], n, 2147483647), axis=1)
        tl.store(values + o_b * K + j, best, mask=m_b)
        tl.store(indices + o_b * K + j, at.to(tl.int64) + OFFSET, mask=m_b)
        v = tl.where(n == at[:, None], float("-inf"), v)


MAX_K = 128  # the running list lives in registers: (BLOCK_B, next_power_of_2(k)) values and indices
MAX_D = 128  # the hidden block and the table tile too: (BLOCK_B, BLOCK_D) and (BLOCK_D, BLOCK_N)
BLOCK_N = 128
PROGRAMS_PER_SM = 4
MAX_CANDIDATES = 8192  # a user's candidates, ranges x k, held by one program of `select_kernel`
# candidates a `select_kernel` program holds, one user's or a few: 512 was the best of 512, 2048 and 8192 in
# `benchmarks/score_topk_kernel.py --sweep` on an H100, or level with 2048
SELECT_BLOCK = 512
FP32_PRECISION = "tf32x3"


def _config(B, D, k):
    """(BLOCK_B, BLOCK_N, BLOCK_D, KP). 16 is the smallest tl.dot size every Triton version and dtype takes, so
    B and D are padded (with masks) to 16 at least. The user block shrinks as k grows, keeping the running list
    near 1024 slots (64 users up to k = 16, 16 from k = 64), and a batch of a few users fills 16 rows, not 64;
    D above 64 halves the item tile to keep the table tile (BLOCK_D, BLOCK_N) small in shared memory."""
    KP = triton.next_power_of_2(k)
    BD = max(16, triton.next_power_of_2(D))
    BB = min(64, max(16, 1024 // KP), max(16, triton.next_power_of_2(B)))
    return BB, BLOCK_N if BD <= 64 else BLOCK_N // 2, BD, KP


def _ranges(N, n_blocks, BN, n_sm, k):
    """(ranges, items per range): whole tiles, as few ranges as give PROGRAMS_PER_SM programs to every SM, and
    no more than leave MAX_CANDIDATES candidates a user."""
    n_tiles = triton.cdiv(N, BN)
    n_ranges = min(n_tiles, triton.cdiv(PROGRAMS_PER_SM * n_sm, n_blocks), MAX_CANDIDATES // k)
    per_range = triton.cdiv(n_tiles, n_ranges) * BN
    return triton.cdiv(N, per_range), per_range


def fused_score_topk(hidden, table, k, *, out=None, active=None, index_offset=0):
    """`kernels.score_topk` on CUDA tensors, always through the kernels: k up to MAX_K, D up to MAX_D.

    hidden (B, D), table (N, D), float32 or bfloat16, any strides; out, active and index_offset as there.
    Returns (values (B, k) float32, indices (B, k) int64), best first. Sizes of its allocations depend on B, N,
    D and k only and nothing syncs with the host, so a CUDA graph can capture it.
    """
    check_inputs(hidden, table, k, out, active)
    check_device(hidden, "fused_score_topk", "kernels.score_topk")
    (B, D), N = hidden.shape, table.shape[0]
    if k > MAX_K or D > MAX_D:
        raise ValueError(f"fused_score_topk takes k <= {MAX_K} and D <= {MAX_D}, got k={k}, D={D}; "
                         f"kernels.score_topk ranks larger ones with the reference")
    BB, BN, BD, KP = _config(B, D, k)
    n_blocks = triton.cdiv(B, BB)
    n_ranges, items = _ranges(N, max(n_blocks, 1), BN, sm_count(hidden.device), k)
    cand_v = empty((B, n_ranges, k), torch.float32, hidden.device, POISON_OUTPUTS)
    cand_i = empty((B, n_ranges, k), torch.int32, hidden.device, POISON_OUTPUTS)
    # the interpreter multiplies bfloat16 as the raw bits it stores them in (uint16), so it dots in float32
    dot_fp32 = torch.float32 in (hidden.dtype, table.dtype) or interpreting()
    score_topk_kernel[(n_blocks, n_ranges)](
        hidden, table, cand_v, cand_i, B, N, D, items, *hidden.stride(), *table.stride(), K=k, KP=KP, BB=BB, BN=BN,
        BD=BD, DOT_FP32=dot_fp32, PRECISION=FP32_PRECISION,
    )
    if out is None:
        out = (empty((B, k), torch.float32, hidden.device, POISON_OUTPUTS),
               empty((B, k), torch.int64, hidden.device, POISON_OUTPUTS))
    BC = triton.next_power_of_2(n_ranges * k)
    rows = max(1, SELECT_BLOCK // BC)
    select_kernel[(triton.cdiv(B, rows),)](cand_v, cand_i, *out, hidden if active is None else active.contiguous(),
                                           B, n_ranges * k, index_offset, K=k, BB=rows, BC=BC,
                                           HAS_ACTIVE=active is not None)
    return out
