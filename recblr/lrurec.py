"""LRURec (Yue et al., WSDM 2024): item embedding -> N x [complex diagonal LRU layer, PFFN] -> tied output.

As in the authors' code: hidden size 2*D, eigenvalues lambda = exp(-nu + i*theta) drawn on the ring
r_min <= |lambda| <= r_max with phase in [0, 2*pi), inputs scaled by gamma = sqrt(1 - |lambda|^2), post-LN
residual blocks with a GELU PFFN of size 4*D, dropout 0.2, truncated-normal(0.02) init. Two departures:
the per-item output bias is dropped (every model here shares the same tied scores), and the complex
projections B and C are kept as real matrices of their real and imaginary parts, which is the same function
class but leaves only real parameters for the optimiser, autocast and checkpoints. Unlike RecBLR, lambda
does not depend on the input, so the scan below needs one power of lambda per doubling step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.device import copy_active
from recblr.base import LayerNorm, SequentialRecommender


@dataclass(frozen=True)
class LRURecConfig:
    n_items: int
    d_model: int = 64
    n_layers: int = 2
    expand: int = 2  # LRU hidden size = expand * d_model complex channels
    dropout: float = 0.2
    r_min: float = 0.8
    r_max: float = 0.99

    def __post_init__(self):
        if min(self.n_items, self.d_model, self.n_layers, self.expand) < 1:
            raise ValueError(f"LRURecConfig: sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LRURecConfig: dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.r_min < self.r_max < 1.0:
            raise ValueError(f"LRURecConfig: need 0 < r_min < r_max < 1, got {self.r_min}, {self.r_max}")


def lru_scan(b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """h_t = lam * h_{t-1} + b_t with h_{-1} = 0, over b (B, T, N) complex and lam (N,) complex.

    Hillis-Steele doubling: after the step of offset k, h_t sums lam^j b_{t-j} for j < 2k, so log2(T)
    steps of T elementwise work each, for any T (no padding to a power of two).
    """
    h, power, k = b, lam, 1
    while k < h.shape[1]:
        h = h + power * torch.cat([torch.zeros_like(h[:, :k]), h[:, :-k]], dim=1)  # (B, T, N)
        power, k = power * power, 2 * k
    return h


class LRULayer(nn.Module):
    """LN(x + Drop(Re(C h) + c)) with h_t = lambda * h_{t-1} + gamma * (B x_t + b)."""

    def __init__(self, cfg: LRURecConfig):
        super().__init__()
        d, n = cfg.d_model, cfg.expand * cfg.d_model
        radius2 = torch.rand(n) * (cfg.r_max ** 2 - cfg.r_min ** 2) + cfg.r_min ** 2  # |lambda|^2, uniform on the ring
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(radius2)))  # (N,)
        self.theta_log = nn.Parameter(torch.log(torch.rand(n).clamp_min(1e-4) * 2 * math.pi))  # (N,)
        self.gamma_log = nn.Parameter(0.5 * torch.log1p(-radius2))  # (N,)
        self.in_proj = nn.Linear(d, 2 * n)  # real and imaginary parts of B x + b
        self.out_proj = nn.Linear(2 * n, d)  # [C_re, -C_im] @ [h_re; h_im] + c = Re(C h) + c
        self.drop = nn.Dropout(cfg.dropout)
        self.ln = LayerNorm(d)

    def lam(self) -> torch.Tensor:  # (N,) complex
        return torch.polar(torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., N) complex, in float32
        re, im = self.in_proj(x).float().chunk(2, dim=-1)
        return torch.complex(re, im) * torch.exp(self.gamma_log)

    def output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # (..., D), (..., N) -> (..., D)
        return self.ln(x + self.drop(self.out_proj(torch.cat([h.real, h.imag], dim=-1).to(x.dtype))))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        """x (B, T, D) after the positions that left the state h0 (B, N) complex (None: none) -> (B, T, D), and the
        state after the last position."""
        b, lam = self.inputs(x), self.lam()  # (B, T, N), (N,)
        if h0 is not None:  # h_0 = lam * h0 + b_0, so the scan from zero continues from h0
            b = torch.cat([b[:, :1] + lam * h0[:, None], b[:, 1:]], dim=1)
        h = lru_scan(b, lam)  # (B, T, N)
        return self.output(x, h), h[:, -1]

    def step(self, x: torch.Tensor, h: torch.Tensor):  # (B, D), (B, N) -> (B, D), (B, N)
        h = self.lam() * h + self.inputs(x)
        return self.output(x, h), h


class Block(nn.Module):
    """h = LRULayer(x); out = LN(h + Drop(W2 Drop(GELU(W1 h))))."""

    def __init__(self, cfg: LRURecConfig):
        super().__init__()
        d = cfg.d_model
        self.lru = LRULayer(cfg)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.ln = LayerNorm(d)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(h + self.drop(self.ffn(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.feed_forward(self.lru(x)[0])

    def prefill(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x (B, T, D) after the positions that left the LRU state `state` (B, N) (None: none) -> (B, T, D), and
        the state after the last position."""
        h, state = self.lru(x, state)
        return self.feed_forward(h), state

    def step(self, x: torch.Tensor, state: torch.Tensor):  # (B, D), (B, N) -> (B, D), (B, N)
        h, state = self.lru.step(x, state)
        return self.feed_forward(h), state


class LRURec(SequentialRecommender):
    supports_recompute = True

    def __init__(self, config: LRURecConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.ln = LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) right-padded with 0 -> hidden (B, T, D); position t sees items[:, :t+1] only."""
        x = self.ln(self.drop(self.item_embedding(items)))  # (B, T, D)
        return self.run_blocks(self.blocks, x)

    def prefill(self, items: torch.Tensor) -> torch.Tensor:
        """The LRU states (n_layers, B, N) after every event of items (B, T), no padding: equal to `step` over each
        column, at the cost of one parallel forward instead of T dependent steps."""
        return torch.stack(self.prefill_blocks(self.blocks, self.ln(self.drop(self.item_embedding(items)))))

    def allocate_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The LRU states (n_layers, B, N) complex, zero before the first event."""
        n = self.config.expand * self.config.d_model
        return torch.zeros(self.config.n_layers, batch_size, n, dtype=torch.complex64, device=device)

    @torch.no_grad()  # a serving step: the state is written in place
    def step(self, items: torch.Tensor, state: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Advance users by one event: items (B,) -> hidden (B, D), as `forward`'s last position; rank with
        `top_k` (or `scores`). The state advances in place where active (B,) bool is True (all when None)."""
        x = self.ln(self.drop(self.item_embedding(items)))  # (B, D)
        for layer, block in enumerate(self.blocks):
            x, new = block.step(x, state[layer])
            copy_active(state[layer], new, active)
        return x
