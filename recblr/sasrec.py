"""SASRec (Kang & McAuley 2018) as RecBole builds it: item + learned position embedding -> N post-LN
Transformer layers with a causal mask -> tied output table.

RecBole's defaults: D=64, 2 layers, 2 heads, inner size 256, GELU, dropout 0.5 in the embedding, attention
and residual branches, LayerNorm eps 1e-12. Sequences are right-padded, so position 0 is the first real
item, as in RecBole; the causal mask alone keeps the padding after position t out of position t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from recblr.base import LayerNorm, SequentialRecommender


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    max_len: int = 50  # the position table's size: the longest input this model accepts

    def __post_init__(self):
        if min(self.n_items, self.d_model, self.n_layers, self.n_heads, self.inner_size, self.max_len) < 1:
            raise ValueError(f"SASRecConfig: sizes must be positive, got {self}")
        if self.d_model % self.n_heads:
            raise ValueError(f"SASRecConfig: d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0):
            raise ValueError(f"SASRecConfig: dropouts must be in [0, 1), got {self}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.n_heads, self.attn_dropout = cfg.n_heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Layer(nn.Module):
    """Post-LN as in the original: h = LN(x + Drop(Attn(x))); out = LN(h + Drop(W2 GELU(W1 h)))."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.ln_1 = LayerNorm(cfg.d_model, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.inner_size), nn.GELU(),
                                 nn.Linear(cfg.inner_size, cfg.d_model))
        self.ln_2 = LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(h + self.drop(self.ffn(h)))


class SASRec(SequentialRecommender):
    supports_recompute = True

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.d_model)
        self.ln = LayerNorm(config.d_model, eps=1e-12)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layers))
        self.apply(self.init_weights)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) right-padded with 0 -> hidden (B, T, D); position t sees items[:, :t+1] only."""
        T = items.shape[1]
        if T > self.config.max_len:
            raise ValueError(f"SASRec: input length {T} exceeds max_len {self.config.max_len}; "
                             f"truncate to the most recent {self.config.max_len} items or raise max_len")
        pos = torch.arange(T, device=items.device)  # (T,)
        x = self.drop(self.ln(self.item_embedding(items) + self.position_embedding(pos)))  # (B, T, D)
        return self.run_blocks(self.layers, x)
