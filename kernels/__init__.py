"""Fused kernels beside their PyTorch references."""
from kernels.bdlru import bdlru, bdlru_reference, chunk_bdlru, fused_recurrent_bdlru
from kernels.block_step import BlockWeights, block_step, block_step_reference, fused_block_step
from kernels.causal_conv import causal_conv_silu, causal_conv_silu_reference, fused_causal_conv_silu
from kernels.layer_norm import fused_layer_norm, layer_norm, layer_norm_reference
from kernels.score_topk import fused_score_topk, score_topk, score_topk_reference

__all__ = ["BlockWeights", "bdlru", "bdlru_reference", "block_step", "block_step_reference", "causal_conv_silu",
           "causal_conv_silu_reference", "chunk_bdlru", "fused_block_step", "fused_causal_conv_silu",
           "fused_layer_norm", "fused_recurrent_bdlru", "fused_score_topk", "layer_norm", "layer_norm_reference",
           "score_topk", "score_topk_reference"]
