"""Fused kernels beside their PyTorch references."""
from kernels.bdlru import bdlru, bdlru_reference

__all__ = ["bdlru", "bdlru_reference"]
