"""Plain-PyTorch BD-LRU: the ground truth every fast path is tested against."""
import torch
import torch.nn.functional as F

from kernels.device import check_float_inputs


def check_inputs(x, r, i, lam, z=None, h0=None):
    """Raise ValueError unless the shapes, dtypes and devices fit one BD-LRU call."""
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"x must be (B, T, D) with T >= 1, got shape {tuple(x.shape)}")
    B, T, D = x.shape
    for name, t in (("r", r), ("i", i), ("z", z)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if lam.shape != (D,):
        raise ValueError(f"lam must be ({D},), got {tuple(lam.shape)}")
    if h0 is not None and h0.shape != (B, D):
        raise ValueError(f"h0 must be ({B}, {D}), got {tuple(h0.shape)}")
    check_float_inputs(x=x, r=r, i=i, lam=lam, z=z, h0=h0)


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
    check_inputs(x, r, i, lam, z, h0)
    x, r, i, lam = (t.float() for t in (x, r, i, lam))
    a, b = bdlru_gates(r, i, lam)  # (B, T, D) each
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.float()  # (B, D)
    hs = []
    for a_t, bx_t in zip(a.unbind(1), (b * x).unbind(1)):
        h = a_t * h + bx_t
        hs.append(h)
    out = torch.stack(hs, dim=1)  # (B, T, D)
    if z is not None:
        out = out * F.silu(z.float())
    return (out, h) if return_state else out
