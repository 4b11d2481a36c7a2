"""Plain-PyTorch LayerNorm over the last dim: the ground truth the fused kernels are tested against."""
import torch
import torch.nn.functional as F

from kernels.device import check_float_inputs


def check_inputs(x, weight, bias):
    """Raise ValueError unless x (..., D) with D >= 1, weight (D,) and bias (D,) fit one call."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., D) with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (D,):
            raise ValueError(f"{name} must be ({D},), got shape {tuple(t.shape)}")
    check_float_inputs(x=x, weight=weight, bias=bias)


def layer_norm_reference(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, in float32 whatever the inputs' dtype."""
    check_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):  # a caller's autocast is not the float32 ground truth
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
