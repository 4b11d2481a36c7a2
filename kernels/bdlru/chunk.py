"""Chunked BD-LRU in Triton: parallel over T as well, for batches too small to fill the GPU.

A sequential-per-channel walk has only B * D / BD programs; at B = 8 that is a few per SM and the GPU idles
on latency. Here T is cut into chunks of one BT-row tile, one program each, and a direction stays a single
launch of the kernels of `fused_recurrent.py` with LOOKBACK: each program scans its chunk from zero,
publishes the chunk's map h -> A h + H, composes the maps its predecessors published into the state entering
its chunk, and only then writes its outputs. Inputs are read once and outputs written once, as in the
sequential kernel; the maps add B * (T / BT) * D int64 of traffic. The backward does the same in reverse
time on q = a_t dL/dh_t, from the forward's per-chunk states.
"""
import torch
import triton

from kernels.bdlru import fused_recurrent
from kernels.bdlru.fused_recurrent import _contiguous, _fit, _kernel_inputs
from kernels.bdlru.naive import check_inputs

# (BT = chunk length, (BD, num_warps) forward, (BD, num_warps) backward) from `benchmarks/bdlru_kernel.py
# --sweep --shapes 8x4096x128_fp32` on an H100: the best fwd + bwd sum of 32 configurations sharing BT
TILES = (32, (32, 4), (8, 1))


def _chunk_config(B, T, D):
    """BT (the chunk length), then (BD, num_warps) forward and backward."""
    return _fit(TILES, T, D)


class ChunkBDLRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, i, lam, z, h0, return_state):
        x, r, i, z, lam, h0 = _kernel_inputs(x, r, i, lam, z, h0)
        BT, fwd, bwd = _chunk_config(*x.shape)
        needs_grad = any(ctx.needs_input_grad[:6])
        o, ckpt, ht = fused_recurrent.bdlru_fwd(x, r, i, lam, z, h0, needs_grad, return_state, BT, *fwd,
                                                lookback=True)
        if needs_grad:
            ctx.save_for_backward(x, r, i, lam, z, ckpt)
            ctx.config, ctx.h0_dtype = (BT, *bwd), h0.dtype if h0 is not None else None
        return (o, ht) if return_state else o

    @staticmethod
    def backward(ctx, do, dht=None):
        x, r, i, lam, z, ckpt = ctx.saved_tensors
        do, dht = _contiguous(do, dht)
        dx, dr, di, dlam, dz, dh0 = fused_recurrent.bdlru_bwd(
            x, r, i, lam, z, ckpt, do, dht, ctx.h0_dtype is not None, *ctx.config, lookback=True)
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
