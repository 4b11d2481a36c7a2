"""Fused kernels beside their PyTorch references."""
from kernels.bdlru import bdlru, bdlru_reference, chunk_bdlru, fused_recurrent_bdlru

__all__ = ["bdlru", "bdlru_reference", "chunk_bdlru", "fused_recurrent_bdlru"]
