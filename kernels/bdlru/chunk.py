"""Chunked BD-LRU in Triton: parallel over T as well, for batches too small to fill the GPU.

A sequential-per-channel walk has only B * D / BD programs; at B = 8 that is a few per SM and the GPU idles
on latency. Here T is cut into chunks of CHUNK rows, one program each, and a direction stays a single launch
of the kernels of `fused_recurrent.py` with LOOKBACK: each program composes its chunk's map h -> A h + H in a
first walk over its tiles, publishes it, composes the maps its predecessors published into the state
entering its chunk, and only then walks the chunk again to write its outputs. Outputs are written once; the
first walk's reads of x, r, i (backward: r, z, do) come back from L2 in the second. The maps add
B * (T / CHUNK) * D int64 of traffic. The backward does the same in reverse time on q = a_t dL/dh_t, from
the forward's per-tile states.
"""
import torch
import triton

from kernels.bdlru import fused_recurrent
from kernels.bdlru.fused_recurrent import _fit
from kernels.bdlru.naive import check_inputs
from kernels.device import check_device

# (BT, (BD, num_warps) forward, (BD, num_warps) backward) and the chunk lengths in rows, forward and
# backward, each a multiple of BT: the best of each direction in `benchmarks/bdlru_kernel.py --sweep --shapes
# 8x4096x128_fp32` on an H100 (56 configurations). The backward's chunk need not be the forward's: it reads
# the forward's state at every BT-row tile, not per chunk.
TILES = (16, (16, 1), (32, 2))
CHUNK = (64, 256)


def _chunk_config(B, T, D):
    """(BT, (BD, num_warps) forward, (BD, num_warps) backward), and the chunk lengths forward and backward."""
    tiles = _fit(TILES, T, D)
    return tiles, tuple(min(rows, tiles[0] * triton.cdiv(T, tiles[0])) for rows in CHUNK)


def chunk_bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """BD-LRU on CUDA tensors, parallel over chunks of T too; same contract as `kernels.bdlru`.

    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). Returns h * silu(z) (or h) in
    the input dtype, and with return_state the final state h_T (B, D) in float32.
    """
    check_inputs(x, r, i, lam, z, h0)
    check_device(x, "chunk_bdlru", "kernels.bdlru")
    return fused_recurrent.BDLRUFunction.apply(x, r, i, lam, z, h0, return_state, *_chunk_config(*x.shape),
                                               torch.is_grad_enabled())
