"""Leave-one-out evaluation by full ranking over every item, and the popularity baseline, under one code path.

The popularity baseline is the registry's "pop" model, so it is ranked by this same code.
The paper's protocol: the target is ranked against all items, items already in the history stay in the
ranking (`remove_history=True` drops them, keeping the target). Ties are broken by item index, so a model
that scores everything alike gains nothing from them. Users are scored a batch at a time, the batch sized so
that (users x items) stays under SCORE_BUDGET floats: 1M users x 100k items is never held at once.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from recblr.data import Prepared, gather

SCORE_BUDGET = 1 << 26  # floats in one (users, items) score block: 256 MiB in float32


def metric_keys(ks=(10, 20)) -> list[str]:
    return [f"{name}_at_{k}" for k in ks for name in ("hr", "ndcg", "mrr")]


@torch.no_grad()
def evaluate(model: nn.Module, data: Prepared, split: str = "test", ks=(10, 20), remove_history: bool = False,
             *, max_len: int = 50, batch_size: int = 4096, progress: bool = True) -> dict:
    """HR, NDCG and MRR at each k, averaged over all users; keys as in `metric_keys(ks)`."""
    inputs, targets = data.split(split)
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    was_training = model.training
    model.eval()
    n_users, n_scores = data.n_users, data.n_items + 1
    rows_per_batch = max(1, min(batch_size, SCORE_BUDGET // n_scores))
    item_idx = torch.arange(n_scores, device=device)
    sums = dict.fromkeys(metric_keys(ks), 0.0)
    starts = range(0, n_users, rows_per_batch)
    for lo in tqdm(starts, desc=f"evaluate {split}", unit="batch", leave=False, disable=not progress):
        rows = np.arange(lo, min(lo + rows_per_batch, n_users))
        start, stop = inputs.last(rows, max_len)
        hidden = model(gather(inputs.flat, start, stop).to(device))  # (B, T, D)
        last = torch.from_numpy(np.maximum(stop - start - 1, 0)).to(device)  # an empty history reads pad
        with torch.autocast(device.type, enabled=False):  # bf16's 8-bit mantissa would tie near scores
            scores = model.scores(hidden[torch.arange(len(rows), device=device), last].float())  # (B, N + 1)
        target = torch.from_numpy(targets[rows]).to(device)[:, None]  # (B, 1)
        target_score = scores.gather(1, target)
        scores = scores.masked_fill(item_idx == 0, float("-inf"))
        if remove_history:
            seen = gather(inputs.flat, inputs.offsets[rows], inputs.offsets[rows + 1]).to(device)
            scores = scores.scatter(1, seen, float("-inf"))
        rank = (scores > target_score).sum(1) + ((scores == target_score) & (item_idx < target)).sum(1)  # (B,)
        for k in ks:
            hit = (rank < k).double()
            sums[f"hr_at_{k}"] += hit.sum().item()
            sums[f"ndcg_at_{k}"] += (hit / torch.log2(rank.double() + 2)).sum().item()
            sums[f"mrr_at_{k}"] += (hit / (rank.double() + 1)).sum().item()
    model.train(was_training)
    return {key: value / max(n_users, 1) for key, value in sums.items()}
