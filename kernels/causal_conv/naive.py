"""Plain-PyTorch causal depthwise conv + SiLU: the ground truth the fused kernel is tested against, and the CPU path."""
import torch
import torch.nn.functional as F

from kernels.device import check_float_inputs


def check_inputs(x, weight, bias=None):
    """Raise ValueError unless x (B, T, C), weight (C, K) and bias (C,) or None fit one call."""
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"x must be (B, T, C) with T >= 1, got shape {tuple(x.shape)}")
    C = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] == 0:
        raise ValueError(f"weight must be ({C}, K) with K >= 1, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be ({C},), got shape {tuple(bias.shape)}")
    check_float_inputs(x=x, weight=weight, bias=bias)


def causal_conv_silu_reference(x, weight, bias=None):
    """y[b, t, c] = silu(bias[c] + sum_j weight[c, j] * x[b, t - (K-1) + j, c]), x = 0 before t = 0.

    Same contract as `kernels.causal_conv_silu`, but returns float32 whatever the input dtype.
    """
    check_inputs(x, weight, bias)
    C, K = weight.shape
    # a caller's autocast would run the conv in bfloat16; this is the float32 ground truth
    with torch.autocast(x.device.type, enabled=False):
        padded = F.pad(x.float().transpose(1, 2), (K - 1, 0))  # (B, C, K-1 + T): zeros before t = 0
        bias = None if bias is None else bias.float()
        pre = F.conv1d(padded, weight.float()[:, None, :], bias, groups=C)  # (B, C, T)
    return F.silu(pre).transpose(1, 2).contiguous()  # (B, T, C)
