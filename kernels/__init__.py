"""Fused kernels beside their PyTorch references."""
from kernels.bdlru import bdlru, bdlru_reference, chunk_bdlru, fused_recurrent_bdlru
from kernels.score_topk import fused_score_topk, score_topk, score_topk_reference

__all__ = ["bdlru", "bdlru_reference", "chunk_bdlru", "fused_recurrent_bdlru", "fused_score_topk", "score_topk",
           "score_topk_reference"]
