"""Plain-PyTorch BD-LRU: the ground truth every fast path is tested against."""
import torch
import torch.nn.functional as F


def bdlru_gates(r: torch.Tensor, i: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forget gate a and input gate b from the pre-activations (RecBLR eq. 4-5)."""
    a = torch.exp(-F.softplus(lam) * torch.sigmoid(r))
    # the 1e-8 keeps sqrt differentiable when a -> 1
    b = torch.sqrt(1 - a * a + 1e-8) * torch.sigmoid(i)
    return a, b


def bdlru_reference(x, r, i, lam, z=None, h0=None, return_state=False):
    """h_t = a_t * h_{t-1} + b_t * x_t over (B, T, D), in float32, optionally gated by silu(z).

    Same signature as `kernels.bdlru`; returns float32 whatever the input dtype.
    """
    x, r, i, lam = (t.float() for t in (x, r, i, lam))
    a, b = bdlru_gates(r, i, lam)  # (B, T, D) each
    bx = b * x
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.float()  # (B, D)
    hs = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + bx[:, t]
        hs.append(h)
    out = torch.stack(hs, dim=1)  # (B, T, D)
    if z is not None:
        out = out * F.silu(z.float())
    return (out, h) if return_state else out
