"""Leave-one-out evaluation by full ranking over every item, and the popularity baseline, under one code path.

The popularity baseline is the registry's "pop" model, so it is ranked by this same code.
The paper's protocol: the target is ranked against all items, items already in the history stay in the
ranking (`remove_history=True` drops them, keeping the target). An item that ties with the target ranks above
it, so a model that scores everything alike gains nothing from ties (item indices follow popularity over every
event, valid and test included, so breaking ties by index would rank by the test targets), and a target scored
NaN or infinite is a miss. Users are scored a batch at a time, the batch sized so
that (users x items) stays under SCORE_BUDGET floats: 1M users x 100k items is never held at once.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from recblr.data import Prepared, Sequences, gather, to_device

SCORE_BUDGET = 1 << 26  # floats in one (rows, items) score block, here and in recblr.loss: 256 MiB in float32
PRECISIONS = ("fp32", "bf16")


def metric_keys(ks=(10, 20)) -> list[str]:
    return [f"{name}_at_{k}" for k in ks for name in ("hr", "ndcg", "mrr")]


def precision_context(device: str, precision: str):
    """Autocast to bfloat16 on `device` for precision "bf16"; a no-op for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    # no cast cache: a CUDA graph cannot capture it (recblr.train.GraphedStep), and each weight is cast once a
    # forward anyway (the item table's second use, the scores, casts its own copy in recblr.loss)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


@torch.no_grad()
def next_item_hidden(model: nn.Module, seqs: Sequences, n_scores: int, *, max_len: int, batch_size: int = 4096,
                     precision: str = "fp32", desc: str = "score",
                     progress: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (rows, hidden (B, D) float32) per chunk of users: the model's output after each user's last
    `max_len` items, from which every item is scored. Chunks keep users x n_scores under SCORE_BUDGET, so a
    chunk's scores fit wherever they are made. precision "bf16" runs the model's forward under bf16 autocast
    ("fp32" leaves a caller's autocast as is)."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    n_users = len(seqs.offsets) - 1
    rows_per_batch = max(1, min(batch_size, SCORE_BUDGET // n_scores))
    with tqdm(total=n_users, desc=desc, unit="user", unit_scale=True, leave=False, disable=not progress) as bar:
        for lo in range(0, n_users, rows_per_batch):
            rows = np.arange(lo, min(lo + rows_per_batch, n_users))
            start, stop = seqs.last(rows, max_len)
            with precision_context(device.type, precision):
                hidden = model(to_device(gather(seqs.flat, start, stop), device))  # (B, T, D)
            last = to_device(np.maximum(stop - start - 1, 0), device)  # an empty input reads pad
            bar.update(len(rows))
            yield rows, hidden[torch.arange(len(rows), device=device), last].float()  # (B, D)


@torch.no_grad()
def next_item_scores(model: nn.Module, seqs: Sequences, n_scores: int, *, max_len: int, batch_size: int = 4096,
                     precision: str = "fp32", desc: str = "score",
                     progress: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (rows, scores (B, n_scores)) per chunk of users (`next_item_hidden`'s): every item scored as the one
    after each user's last `max_len` items, in float32, padding at -inf."""
    for rows, hidden in next_item_hidden(model, seqs, n_scores, max_len=max_len, batch_size=batch_size,
                                         precision=precision, desc=desc, progress=progress):
        with torch.autocast(hidden.device.type, enabled=False):  # bf16's 8-bit mantissa would tie near scores
            scores = model.scores(hidden)  # (B, N + 1)
        padding = torch.arange(n_scores, device=hidden.device) == 0
        yield rows, scores.masked_fill(padding, float("-inf"))  # a fresh tensor: scores may be a broadcast view


def mask_seen(scores: torch.Tensor, seqs: Sequences, rows: np.ndarray) -> torch.Tensor:
    """Scores with every item of the users' whole sequences at -inf (in place)."""
    seen = to_device(gather(seqs.flat, seqs.offsets[rows], seqs.offsets[rows + 1]), scores.device)  # (B, L), 0-padded
    return scores.scatter_(1, seen, float("-inf"))


def evaluate(model: nn.Module, data: Prepared, split: str = "test", ks=(10, 20), remove_history: bool = False,
             *, max_len: int = 50, batch_size: int = 4096, progress: bool = True) -> dict:
    """HR, NDCG and MRR at each k, averaged over all users; keys as in `metric_keys(ks)`."""
    trained_on = getattr(getattr(model, "config", None), "n_items", data.n_items)
    if trained_on != data.n_items:
        raise ValueError(f"the model scores {trained_on} items and the prepared data has {data.n_items}: evaluate a "
                         "model on the prepared data it was trained on")
    inputs, targets = data.split(split)
    return rank_metrics(model, inputs, targets, data.n_items + 1, ks, remove_history, max_len=max_len,
                        batch_size=batch_size, desc=f"evaluate {split}", progress=progress)


def rank_metrics(model: nn.Module, inputs: Sequences, targets: np.ndarray, n_scores: int, ks=(10, 20),
                 remove_history: bool = False, *, max_len: int = 50, batch_size: int = 4096,
                 unranked: np.ndarray | None = None, desc: str = "evaluate", progress: bool = True) -> dict:
    """`evaluate` on inputs and targets (U,) given in the model's item indices; a target 0 (an item the model
    does not have) is a miss. unranked: (n_scores,) bool, items left out of the ranking (scored -inf), e.g.
    a model's items that another catalogue lacks."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(metric_keys(ks), 0.0)
    for rows, scores in next_item_scores(model, inputs, n_scores, max_len=max_len, batch_size=batch_size,
                                         desc=desc, progress=progress):
        if unranked is not None:
            scores.masked_fill_(torch.from_numpy(unranked).to(scores.device), float("-inf"))
        target = torch.from_numpy(targets[rows]).to(scores.device)[:, None]  # (B, 1)
        target_score = scores.gather(1, target)  # taken first: history removal keeps the target's own score
        if remove_history:
            mask_seen(scores, inputs, rows)
        item_idx = torch.arange(scores.shape[1], device=scores.device)
        rank = (scores >= target_score).logical_and_(item_idx != target).sum(1)  # (B,): ties count as ranked above
        rank = rank.masked_fill_(~target_score[:, 0].isfinite(), scores.shape[1])  # NaN compares false: no free hit
        for k in ks:
            hit = (rank < k).double()
            sums[f"hr_at_{k}"] += hit.sum().item()
            sums[f"ndcg_at_{k}"] += (hit / torch.log2(rank.double() + 2)).sum().item()
            sums[f"mrr_at_{k}"] += (hit / (rank.double() + 1)).sum().item()
    model.train(was_training)
    return {key: value / max(len(targets), 1) for key, value in sums.items()}
