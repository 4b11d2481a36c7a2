from kernels.bdlru.fused_recurrent import fused_recurrent_bdlru
from kernels.bdlru.naive import bdlru_reference


def bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """Behavior-dependent linear recurrence, fused: gates, scan and output gate in one pass.

    a = exp(-softplus(lam) * sigmoid(r)), b = sqrt(1 - a^2 + 1e-8) * sigmoid(i),
    h_t = a_t * h_{t-1} + b_t * x_t with h_{-1} = h0 (or 0); returns h * silu(z) (h without z) in x's
    dtype, and with return_state a tuple (out, h_T) with h_T float32 (B, D).
    x, r, i, z: (B, T, D) float32 or bfloat16; lam: (D,); h0: (B, D). CUDA tensors take the Triton
    kernel; CPU tensors take the reference (float32 maths, a loop over T that autograd
    differentiates), so models also train without a GPU.
    """
    if x.is_cuda:
        return fused_recurrent_bdlru(x, r, i, lam, z=z, h0=h0, return_state=return_state)
    out = bdlru_reference(x, r, i, lam, z=z, h0=h0, return_state=return_state)
    return (out[0].to(x.dtype), out[1]) if return_state else out.to(x.dtype)


__all__ = ["bdlru", "bdlru_reference", "fused_recurrent_bdlru"]
