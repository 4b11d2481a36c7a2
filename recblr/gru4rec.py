"""GRU4Rec (Hidasi et al. 2016) as RecBole builds it: item embedding -> dropout -> GRU -> linear back to D
-> tied output table.

RecBole's defaults: embedding 64, hidden 128, one layer, GRU without biases, dropout 0.3 on the embedding,
Xavier init of the embedding and the GRU. Right padding needs no mask: a GRU's output at t never sees the
inputs after t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels.device import copy_active
from recblr.base import SequentialRecommender


@dataclass(frozen=True)
class GRU4RecConfig:
    n_items: int
    d_model: int = 64
    d_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.3

    def __post_init__(self):
        if min(self.n_items, self.d_model, self.d_hidden, self.n_layers) < 1:
            raise ValueError(f"GRU4RecConfig: sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GRU4RecConfig: dropout must be in [0, 1), got {self.dropout}")


class GRU4Rec(SequentialRecommender):
    def __init__(self, config: GRU4RecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.d_model, config.d_hidden, config.n_layers, bias=False, batch_first=True)
        self.out = nn.Linear(config.d_hidden, config.d_model)
        nn.init.xavier_normal_(self.item_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        for w in self.gru.parameters():
            nn.init.xavier_uniform_(w)  # the output layer keeps torch's default, as in RecBole

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) right-padded with 0 -> hidden (B, T, D); position t sees items[:, :t+1] only."""
        y, _ = self.gru(self.drop(self.item_embedding(items)))  # (B, T, H)
        return self.out(y)  # (B, T, D)

    def allocate_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The GRU's hidden state (n_layers, B, H), zero before the first event."""
        return torch.zeros(self.config.n_layers, batch_size, self.config.d_hidden, device=device)

    @torch.no_grad()  # a serving step: the state is written in place
    def step(self, items: torch.Tensor, state: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Advance users by one event: items (B,) -> hidden (B, D), as `forward`'s last position; rank with
        `top_k` (or `scores`). The state advances in place where active (B,) bool is True (all when None)."""
        y, new = self.gru(self.drop(self.item_embedding(items[:, None])), state)  # (B, 1, H)
        copy_active(state, new, active, dim=1)
        return self.out(y[:, 0])
