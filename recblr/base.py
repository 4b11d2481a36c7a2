"""What every sequential recommender here shares: the tied item table, full-softmax scores, top-k and the init.

The training and evaluation code only touches this surface (see the protocol in `recblr.models`), so a new
model is a config dataclass plus `forward(items) -> hidden`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels import layer_norm, score_topk

# positions of a recurrent block that its backward recomputes at once under TrainConfig.recompute: fewer hold less
# memory and launch more kernels
RECOMPUTE_SPAN = 128
# a step issued eagerly on CUDA spends about 8 ms of host time on a RecBLR span's ~120 launches (forward, recompute and
# backward), longer than the GPU takes below about this many positions a span (batch x span); so there spans hold
# at least these (benchmarks/RESULTS.md, "Session 19")
EAGER_SPAN_POSITIONS = 2 ** 18


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same checkpoints) through `kernels.layer_norm`: on CUDA one Triton pass each
    way over the models' narrow rows, where PyTorch's kernels are built for wide ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class SequentialRecommender(nn.Module):
    """Base class: subclasses set `self.config` and `self.item_embedding` and define `forward`."""

    config: object
    item_embedding: nn.Embedding  # (n_items + 1, D), row 0 is padding and stays zero
    supports_recompute = False  # True where forward runs its blocks through `run_blocks`
    recompute = False  # set for training by TrainConfig.recompute (recblr.train.stepped)
    graphed = False  # set by recblr.train.stepped where steps replay from CUDA graphs, so launches cost no host time

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) through each block in turn. Under `recompute`, while training with gradients, a block
        keeps only its input and runs its forward again in the backward, with the same dropout masks: the
        activations of one block are held at a time instead of all of them, for one more forward a block."""
        for block in blocks:
            x = self.recompute_block(block, x) if self.recompute and self.training and torch.is_grad_enabled() \
                else block(x)
        return x

    def recompute_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) through the block, keeping only what its backward re-runs from: the block whole, or, where
        the block carries a state from position to position (`block.prefill(x, state) -> (y, state)`: RecBLR,
        LRURec), in spans of RECOMPUTE_SPAN positions (in an eager CUDA step, of at least EAGER_SPAN_POSITIONS
        positions). A span keeps only its input and the state the span before left: a recurrence needs nothing else
        from earlier positions, so the backward holds one span's activations instead of the block's. Same maths as
        `block(x)`; dropout draws per span. Attention needs every earlier key and value, so SASRec re-runs whole."""
        if not hasattr(block, "prefill"):
            return checkpoint(block, x, use_reentrant=False)
        span = RECOMPUTE_SPAN
        if x.is_cuda and not self.graphed:  # launches cost host time: spans long enough for the GPU to set the pace
            span = max(span, -(-EAGER_SPAN_POSITIONS // x.shape[0]))
        spans, state = [], None
        for start in range(0, x.shape[1], span):
            y, state = checkpoint(block.prefill, x[:, start:start + span], state, use_reentrant=False)
            spans.append(y)
        return torch.cat(spans, dim=1)

    def prefill_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> list:
        """x (B, T, D) through each block's `prefill` from no state -> the state each block holds after the last
        position: what `step` over every position would leave, for one parallel forward instead of T steps."""
        states = []
        for block in blocks:
            x, state = block.prefill(x)
            states.append(state)
        return states

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., n_items + 1) logits against the tied item table.

        Training's loss computes these same logits itself, a chunk at a time (recblr.loss), so a model
        that scored otherwise would need it to follow."""
        return hidden @ self.item_embedding.weight.T

    @torch.no_grad()
    def top_k(self, hidden: torch.Tensor, k: int, out=None, active=None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, D) -> (items (B, k), scores (B, k) float32), best first; item 0 (padding) never.

        The one ranking of serving, the pyfunc, batch recommendation and the inference benchmark:
        `kernels.score_topk` over the table without its padding row (a view, not a copy), which on CUDA never
        makes the (B, n_items + 1) scores and which a CUDA graph can capture. A ranking: no gradient. out =
        (items, scores) to write into, only in the rows where active (B,) bool is True when given, as
        `kernels.score_topk` takes them.
        """
        values, indices = score_topk(hidden, self.item_embedding.weight[1:], k, index_offset=1,
                                     out=None if out is None else (out[1], out[0]), active=active)
        return indices, values

    def init_weights(self, module: nn.Module) -> None:
        """SASRec/RecBole init, used by the authors for RecBLR too: N(0, 0.02) weights, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
