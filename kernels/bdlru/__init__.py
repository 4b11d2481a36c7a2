import triton

from kernels.bdlru import fused_recurrent
from kernels.bdlru.chunk import chunk_bdlru
from kernels.bdlru.fused_recurrent import fused_recurrent_bdlru
from kernels.bdlru.naive import bdlru_reference, check_inputs
from kernels.device import sm_count


def use_chunk(B, T, D, dtype, n_sm):
    """Chunk over T when the fused kernel's (batch, channel block) programs cannot cover every SM."""
    BT, (BD, _), _ = fused_recurrent._fit(fused_recurrent.TILES[dtype], T, D)
    return T > 4 * BT and B * triton.cdiv(D, BD) < n_sm


def bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """Behavior-dependent linear recurrence, fused: gates, scan and output gate in one pass.

    a = exp(-softplus(lam) * sigmoid(r)), b = sqrt(1 - a^2 + 1e-8) * sigmoid(i),
    h_t = a_t * h_{t-1} + b_t * x_t with h_{-1} = h0 (or 0); returns h * silu(z) (h without z) in x's
    dtype, and with return_state a tuple (out, h_T) with h_T float32 (B, D).
    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). CUDA tensors take a Triton kernel
    (`chunk_bdlru` when the batch is too small to fill the GPU, else `fused_recurrent_bdlru`); CPU tensors
    take the reference (float32 maths, a loop over T that autograd differentiates), so models also train
    without a GPU.
    """
    if x.is_cuda:
        check_inputs(x, r, i, lam, z, h0)
        fn = chunk_bdlru if use_chunk(*x.shape, x.dtype, sm_count(x.device)) else fused_recurrent_bdlru
        return fn(x, r, i, lam, z=z, h0=h0, return_state=return_state)
    out = bdlru_reference(x, r, i, lam, z=z, h0=h0, return_state=return_state)
    return (out[0].to(x.dtype), out[1]) if return_state else out.to(x.dtype)


__all__ = ["bdlru", "bdlru_reference", "chunk_bdlru", "fused_recurrent_bdlru", "use_chunk"]
