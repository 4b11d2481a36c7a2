"""RecBLR (Liu et al. 2024): item embedding -> N x [gated BD-LRU layer, PFFN] -> tied output table.

Where the paper's text is open or differs, this follows the authors' code (see the top of PAPER.md):
post-LayerNorm residual blocks, expansion E=2, a causal depthwise conv of width 4, and Lambda spread so that
exp(-softplus(Lambda)) spans [0.9, 0.999] evenly in Lambda, not uniformly in the decay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import BlockWeights, bdlru, block_step, causal_conv_silu
from recblr.base import LayerNorm, SequentialRecommender


@dataclass(frozen=True)
class RecBLRConfig:
    n_items: int
    d_model: int = 64
    n_layers: int = 2
    expand: int = 2
    d_conv: int = 4
    dropout: float = 0.2
    # the ablations of paper Table 3 (n_layers=1 is the fourth)
    use_conv: bool = True
    use_ffn: bool = True
    lambda_init: str = "paper"  # "paper": the deterministic span above; "random": Lambda ~ N(0, 1)

    def __post_init__(self):
        if self.n_items < 1 or self.d_model < 1 or self.n_layers < 1 or self.expand < 1 or self.d_conv < 1:
            raise ValueError(f"RecBLRConfig: sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RecBLRConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.lambda_init not in ("paper", "random"):
            raise ValueError(f"RecBLRConfig: lambda_init must be 'paper' or 'random', got {self.lambda_init!r}")


def init_lambda(size: int, how: str) -> torch.Tensor:
    if how == "random":
        return torch.randn(size)
    inv_softplus = lambda y: math.log(math.expm1(y))  # noqa: E731
    return torch.linspace(inv_softplus(-math.log(0.9)), inv_softplus(-math.log(0.999)), size)


class GatedRecurrentLayer(nn.Module):
    """Paper Algorithm 1: expand, causal conv + SiLU, BD-LRU gated by SiLU(z), project back."""

    def __init__(self, cfg: RecBLRConfig):
        super().__init__()
        d, e = cfg.d_model, cfg.expand * cfg.d_model
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        # depthwise over time, causal: forward passes its weight and bias to the fused kernel, step applies them
        # to its window; the module is never called, it keeps Conv1d's init and the checkpoints' parameter names
        self.conv = nn.Conv1d(e, e, cfg.d_conv, groups=e) if cfg.use_conv else None
        self.gates = nn.Linear(e, 2 * e)
        self.lam = nn.Parameter(init_lambda(e, cfg.lambda_init))  # (E*D,)
        self.out_proj = nn.Linear(e, d, bias=False)

    def forward(self, u: torch.Tensor, state: tuple | None = None, return_state: bool = False):
        """u (B, T, D) -> (B, T, D), from the state that `step` keeps (zeros when None); with return_state also
        the state after the last position."""
        T = u.shape[1]
        x_in, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E*D) each, row stride 2*E*D
        window, h0 = state if state is not None else (None, None)
        if window is not None:  # the conv sees the k pre-conv inputs before t = 0 instead of zeros
            x_in = torch.cat([window.transpose(1, 2), x_in], dim=1)  # (B, k + T, E*D)
        if self.conv is not None:  # x_in is read in place; x comes back contiguous for the gates
            x = causal_conv_silu(x_in, self.conv.weight[:, 0], self.conv.bias)  # (B, k + T, E*D)
        else:
            x = F.silu(x_in)
        x = x[:, x.shape[1] - T:]  # (B, T, E*D)
        r, i = self.gates(x).chunk(2, dim=-1)  # (B, T, E*D) each
        if not return_state:
            return self.out_proj(bdlru(x, r, i, self.lam, z=z, h0=h0))  # (B, T, D)
        y, h = bdlru(x, r, i, self.lam, z=z, h0=h0, return_state=True)
        k = self.conv.kernel_size[0] - 1 if self.conv is not None else 0
        # the last k pre-conv inputs (zeros before t=0), copied so the (B, E*D, T) buffer can be freed
        window = F.pad(x_in.transpose(1, 2), (k, 0))[..., x_in.shape[1]:].clone()  # (B, E*D, k)
        return self.out_proj(y), (window, h)


class Block(nn.Module):
    """h = LN(x + Dropout(GRL(x))); out = LN(h + Dropout(W2 Dropout(SiLU(W1 h))))."""

    def __init__(self, cfg: RecBLRConfig):
        super().__init__()
        d = cfg.d_model
        self.recurrent = GatedRecurrentLayer(cfg)
        self.ln_1 = LayerNorm(d, eps=1e-12)
        self.ffn = nn.Sequential(
            nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(cfg.dropout), nn.Linear(4 * d, d)
        ) if cfg.use_ffn else None
        self.ln_2 = LayerNorm(d, eps=1e-12) if cfg.use_ffn else None
        self.drop = nn.Dropout(cfg.dropout)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.ffn is None else self.ln_2(h + self.drop(self.ffn(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.feed_forward(self.ln_1(x + self.drop(self.recurrent(x))))

    def prefill(self, x: torch.Tensor, state: tuple | None = None):
        """x (B, T, D) after the positions that left the layer state `state` (None: none) -> (B, T, D), and the
        layer state after the last position."""
        y, state = self.recurrent(x, state, return_state=True)
        return self.feed_forward(self.ln_1(x + self.drop(y))), state

    def step_weights(self) -> BlockWeights:
        rec, ffn = self.recurrent, self.ffn
        return BlockWeights(
            in_proj=rec.in_proj.weight, conv=None if rec.conv is None else (rec.conv.weight[:, 0], rec.conv.bias),
            gates=(rec.gates.weight, rec.gates.bias), lam=rec.lam, out_proj=rec.out_proj.weight,
            ln_1=(self.ln_1.weight, self.ln_1.bias),
            ffn=None if ffn is None else (ffn[0].weight, ffn[0].bias, ffn[3].weight, ffn[3].bias),
            ln_2=None if self.ln_2 is None else (self.ln_2.weight, self.ln_2.bias), eps=self.ln_1.eps)


class RecBLR(SequentialRecommender):
    supports_recompute = True

    def __init__(self, config: RecBLRConfig):
        super().__init__()
        self.config = config
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.ln = LayerNorm(config.d_model, eps=1e-12)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.apply(self.init_weights)  # Linear/Embedding only: Conv1d keeps its default, Lambda its span

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, T) right-padded with 0 -> hidden (B, T, D); position t sees items[:, :t+1] only."""
        x = self.ln(self.drop(self.item_embedding(items)))  # (B, T, D)
        return self.run_blocks(self.blocks, x)

    def prefill(self, items: torch.Tensor) -> list:
        """The state after every event of items (B, T), no padding: equal to `step` over each column,
        at the cost of one parallel forward instead of T dependent steps."""
        return self.prefill_blocks(self.blocks, self.ln(self.drop(self.item_embedding(items))))

    def allocate_state(self, batch_size: int, device: torch.device | str = "cpu") -> list:
        """Per layer: the conv's last k-1 inputs and the BD-LRU hidden state, all zero (no history yet)."""
        e = self.config.expand * self.config.d_model
        k = self.config.d_conv - 1 if self.config.use_conv else 0
        return [(torch.zeros(batch_size, e, k, device=device), torch.zeros(batch_size, e, device=device))
                for _ in self.blocks]

    @torch.no_grad()  # a serving step: the state is written in place
    def step(self, items: torch.Tensor, state: list, active: torch.Tensor | None = None) -> torch.Tensor:
        """Advance users by one event: items (B,) -> hidden (B, D), as `forward`'s last position in eval mode
        (serving: no dropout); rank with `top_k` (or `scores`). The state advances in place, in the rows where
        active (B,) bool is True (all when None); the other rows' hidden are to be ignored."""
        # per layer: state = (conv window (B, E*D, k-1) of past pre-conv inputs, h (B, E*D)). On the GPU each
        # block is one kernel (kernels.block_step), the first one also looking up and normalising the items
        x, rows, ln_in = self.item_embedding.weight, items, (self.ln.weight, self.ln.bias)
        for block, layer_state in zip(self.blocks, state):
            x = block_step(x, *layer_state, block.step_weights()._replace(ln_in=ln_in), active, rows)  # (B, D)
            rows = ln_in = None
        return x
