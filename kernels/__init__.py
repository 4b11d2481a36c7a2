"""Fused kernels beside their PyTorch references."""
from kernels.bdlru import bdlru, bdlru_reference, chunk_bdlru, fused_recurrent_bdlru
from kernels.causal_conv import causal_conv_silu, causal_conv_silu_reference, fused_causal_conv_silu
from kernels.score_topk import fused_score_topk, score_topk, score_topk_reference

__all__ = ["bdlru", "bdlru_reference", "causal_conv_silu", "causal_conv_silu_reference", "chunk_bdlru",
           "fused_causal_conv_silu", "fused_recurrent_bdlru", "fused_score_topk", "score_topk", "score_topk_reference"]
