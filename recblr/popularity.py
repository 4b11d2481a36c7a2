"""Popularity as a registry model, so `--model pop` goes through the same fit, evaluate, save and serve path.

Scores are temperature * log(1 + training count): the counts sit in the tied item table (a (N + 1, 1)
frozen embedding, filled by `fit_counts` before training) and the one trainable number, the temperature,
is what the shared cross-entropy loop fits. The ranking is the counts' whatever the temperature, as long
as it stays positive; the loop only calibrates how peaked the distribution is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from recblr.base import SequentialRecommender


@dataclass(frozen=True)
class PopularityConfig:
    n_items: int

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError(f"PopularityConfig: n_items must be positive, got {self.n_items}")


class Popularity(SequentialRecommender):
    def __init__(self, config: PopularityConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, 1, padding_idx=0)  # log(1 + count) per item
        self.item_embedding.weight.requires_grad_(False)
        nn.init.zeros_(self.item_embedding.weight)
        self.temperature = nn.Parameter(torch.ones(1))

    def fit_counts(self, counts: np.ndarray) -> None:
        """counts (n_items + 1,): each item's number of training events; index 0 (padding) is ignored."""
        if counts.shape != (self.config.n_items + 1,):
            raise ValueError(f"Popularity: counts has shape {counts.shape}, expected ({self.config.n_items + 1},)")
        with torch.no_grad():
            table = torch.log1p(torch.as_tensor(counts, dtype=torch.float32))
            self.item_embedding.weight.copy_(table[:, None])
            self.item_embedding.weight[0] = 0

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) -> hidden (B, T, 1): the same for every user and position."""
        return self.temperature.expand(*items.shape, 1)
