"""Full-ranking leave-one-out metrics against a sort-based reference, history removal, batching, popularity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import recblr.evaluate as ev
from prepared_data import write_prepared
from recblr.data import load_prepared
from recblr.base import SequentialRecommender
from recblr.models import build

N_ITEMS = 30


class NearLastItem(nn.Module):
    """Scores item j by -|j - last item| (rounded, so ties happen): a ranking we can reproduce by sorting."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, items):  # (B, T) -> (B, T, 1)
        return items.float()[..., None] + self.anchor

    def scores(self, hidden):  # (B, 1) -> (B, N + 1)
        return -(torch.arange(N_ITEMS + 1).float() - hidden).abs().div(2).floor()


def reference_metrics(inputs: list[list[int]], targets: list[int], remove_history: bool, ks=(10, 20)) -> dict:
    sums = {f"{m}_at_{k}": 0.0 for k in ks for m in ("hr", "ndcg", "mrr")}
    for seq, target in zip(inputs, targets):
        last = seq[-1] if seq else 0
        candidates = [j for j in range(1, N_ITEMS + 1) if j == target or not (remove_history and j in seq)]
        ranked = sorted(candidates, key=lambda j: (np.floor(abs(j - last) / 2), j == target))  # the target after ties
        rank = ranked.index(target)
        for k in ks:
            if rank < k:
                sums[f"hr_at_{k}"] += 1
                sums[f"ndcg_at_{k}"] += 1 / np.log2(rank + 2)
                sums[f"mrr_at_{k}"] += 1 / (rank + 1)
    return {key: value / len(targets) for key, value in sums.items()}


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [list(rng.integers(1, N_ITEMS + 1, size=rng.integers(2, 9))) for _ in range(57)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, sequences):
    return load_prepared(write_prepared(tmp_path_factory.mktemp("ev") / "prepared", sequences, N_ITEMS))


@pytest.mark.parametrize("remove_history", [False, True], ids=["paper_protocol", "history_removed"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_metrics_match_a_sort_based_reference(data, sequences, split, remove_history):
    cut = 2 if split == "valid" else 1
    inputs = [[int(j) for j in s[:-cut]] for s in sequences]
    targets = [int(s[-cut]) for s in sequences]
    got = ev.evaluate(NearLastItem(), data, split, remove_history=remove_history, progress=False)
    want = reference_metrics(inputs, targets, remove_history)
    assert list(got) == ev.metric_keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_removing_history_never_ranks_a_target_lower(data):
    kept = ev.evaluate(NearLastItem(), data, "test", progress=False)
    removed = ev.evaluate(NearLastItem(), data, "test", remove_history=True, progress=False)
    assert all(removed[k] >= kept[k] for k in kept)
    assert removed != kept


def test_small_batches_give_the_same_numbers(data, monkeypatch):
    whole = ev.evaluate(NearLastItem(), data, "test", progress=False)
    monkeypatch.setattr(ev, "SCORE_BUDGET", 3 * (N_ITEMS + 1))  # three users per block
    assert ev.evaluate(NearLastItem(), data, "test", progress=False) == pytest.approx(whole)


def test_popularity_baseline_goes_through_the_same_path(tmp_path):
    # item 1 is everyone's favourite in training; half the users also end on it
    sequences = [[1, 1, 2 + u % 5, 1, 1 if u % 2 else 7] for u in range(40)]
    data = load_prepared(write_prepared(tmp_path / "prepared", sequences, 10))
    pop = build("pop", data.n_items)
    pop.fit_counts(data.item_counts())
    metrics = ev.evaluate(pop, data, "test", ks=(1, 10), progress=False)
    assert metrics["hr_at_1"] == pytest.approx(0.5)
    assert metrics["mrr_at_10"] > metrics["hr_at_1"]


def test_users_without_history_are_still_ranked(tmp_path):
    data = load_prepared(write_prepared(tmp_path / "prepared", [[3, 4], [5, 6, 7]], 8))
    torch.manual_seed(0)
    metrics = ev.evaluate(build("recblr", 8, d_model=8), data, "valid", progress=False)
    assert all(0 <= v <= 1 for v in metrics.values())


def test_unknown_split_is_refused(data):
    with pytest.raises(ValueError, match="split"):
        ev.evaluate(NearLastItem(), data, "train", progress=False)


class AlmostTied(SequentialRecommender):
    """Scores item j as 1 + j/10^4: apart in float32, all one value in bfloat16 (8-bit mantissa)."""

    def __init__(self):
        super().__init__()
        self.item_embedding = nn.Embedding(N_ITEMS + 1, 1, padding_idx=0)
        with torch.no_grad():
            self.item_embedding.weight[:, 0] = 1 + torch.arange(N_ITEMS + 1) * 1e-4

    def forward(self, items):  # (B, T) -> (B, T, 1)
        return torch.ones(*items.shape, 1)


def test_ranking_scores_stay_float32_under_bf16_autocast(tmp_path):
    data = load_prepared(write_prepared(tmp_path / "prepared", [[2, 3, 4, 1, 1]] * 4, N_ITEMS))
    exact = ev.evaluate(AlmostTied(), data, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ev.evaluate(AlmostTied(), data, progress=False)
    assert exact["hr_at_20"] == 0.0  # the target, item 1, has the lowest score of 30 in float32
    assert mixed == exact


class Constant(SequentialRecommender):
    """Scores every item `value`: a collapsed model (1.0) or a diverged one (NaN)."""

    def __init__(self, value: float):
        super().__init__()
        self.item_embedding = nn.Embedding(N_ITEMS + 1, 1, padding_idx=0)
        with torch.no_grad():
            self.item_embedding.weight.fill_(value)

    def forward(self, items):  # (B, T) -> (B, T, 1)
        return torch.ones(*items.shape, 1)


@pytest.mark.parametrize("value", [1.0, float("nan")], ids=["tied", "nan"])
def test_tied_or_nan_scores_earn_nothing(data, value):
    # item ids follow popularity over every event, test targets included: ties broken by id would rank by them
    assert all(v == 0.0 for v in ev.evaluate(Constant(value), data, "test", progress=False).values())


def test_a_model_of_another_item_count_is_refused(data):
    with pytest.raises(ValueError, match=f"the model scores {N_ITEMS + 5} items and the prepared data has {N_ITEMS}"):
        ev.evaluate(build("recblr", N_ITEMS + 5, d_model=8), data, "test", progress=False)
