"""Chunked BD-LRU in Triton: parallel over T as well, for batches too small to fill the GPU.

A sequential-per-channel walk has only B * D / BD programs; at B = 8 that is a few per SM and the GPU idles
on latency. Here T is cut into chunks of one BT-row tile, one program each, and a direction stays a single
launch of the kernels of `fused_recurrent.py` with LOOKBACK: each program scans its chunk from zero,
publishes the chunk's map h -> A h + H, composes the maps its predecessors published into the state entering
its chunk, and only then writes its outputs. Inputs are read once and outputs written once, as in the
sequential kernel; the maps add B * (T / BT) * D int64 of traffic. The backward does the same in reverse
time on q = a_t dL/dh_t, from the forward's per-chunk states.
"""
from kernels.bdlru import fused_recurrent
from kernels.bdlru.fused_recurrent import _fit
from kernels.bdlru.naive import check_inputs

# (BT = chunk length, (BD, num_warps) forward, (BD, num_warps) backward) from `benchmarks/bdlru_kernel.py
# --sweep --shapes 8x4096x128_fp32` on an H100: of 32 configurations, the best forward and the best backward
# among those with the chunk length of the best fwd + bwd sum
TILES = (32, (32, 4), (8, 1))


def _chunk_config(B, T, D):
    """BT (the chunk length), then (BD, num_warps) forward and backward."""
    return _fit(TILES, T, D)


def chunk_bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """BD-LRU on CUDA tensors, parallel over chunks of T too; same contract as `kernels.bdlru`.

    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). Returns h * silu(z) (or h) in
    the input dtype, and with return_state the final state h_T (B, D) in float32.
    """
    check_inputs(x, r, i, lam, z, h0)
    fused_recurrent.check_device(x, "chunk_bdlru")
    return fused_recurrent.BDLRUFunction.apply(x, r, i, lam, z, h0, return_state, _chunk_config(*x.shape), True)
