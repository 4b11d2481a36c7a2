import torch
import torch.nn.functional as F

from kernels.layer_norm import fused
from kernels.layer_norm.fused import fused_layer_norm
from kernels.layer_norm.naive import check_inputs, layer_norm_reference


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias, as F.layer_norm.

    x (..., D), weight and bias (D,). CUDA tensors with D <= fused.MAX_D take the Triton kernels
    (`fused_layer_norm`: one pass each way, at the copy floor where PyTorch's kernels for narrow rows are not);
    under autocast they normalise in float32 and return float32, as autocast runs F.layer_norm. CPU tensors
    and wider rows take F.layer_norm itself.
    """
    check_inputs(x, weight, bias)
    if not (x.is_cuda and x.shape[-1] <= fused.MAX_D):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias = x.float(), weight.float(), bias.float()
    return fused_layer_norm(x, weight, bias, eps)


__all__ = ["fused_layer_norm", "layer_norm", "layer_norm_reference"]
