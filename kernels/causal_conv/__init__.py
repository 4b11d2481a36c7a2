from kernels.causal_conv.fused import fused_causal_conv_silu
from kernels.causal_conv.naive import causal_conv_silu_reference


def causal_conv_silu(x, weight, bias=None):
    """Causal depthwise conv + SiLU: y[b, t] = silu(bias + sum_j weight[:, j] * x[b, t - (K-1) + j]), with
    x = 0 before t = 0, so y[t] sees x up to t only.

    x (B, T, C) float32 or bfloat16, read in place through its batch and row strides (the half of a
    projection's output that `.chunk` returns is not copied); weight (C, K) (a Conv1d's `weight[:, 0]`), bias
    (C,) or None. Returns y (B, T, C) contiguous in x's dtype. CUDA tensors take the fused Triton kernels
    (`fused_causal_conv_silu`); CPU tensors take the reference (F.conv1d in float32), so models also train
    without a GPU.
    """
    if x.is_cuda:
        return fused_causal_conv_silu(x, weight, bias)
    return causal_conv_silu_reference(x, weight, bias).to(x.dtype)


__all__ = ["causal_conv_silu", "causal_conv_silu_reference", "fused_causal_conv_silu"]
