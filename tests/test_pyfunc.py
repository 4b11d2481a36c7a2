"""The registered pyfunc as a caller meets it, through MLflow's schema enforcement: cold-start histories, integer
ids, k and malformed input."""
from __future__ import annotations

import re

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipeline import tracking
from prepared_data import write_prepared
from recblr import models

N_ITEMS = 30
IDS = [str(i * 7) for i in range(1, N_ITEMS + 1)]  # numeric raw ids, as many logs have


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the loaded pyfunc, its items.parquet) of a small RecBLR registered as the pipeline registers it."""
    root = tmp_path_factory.mktemp("pyfunc")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, N_ITEMS + 1, size=rng.integers(5, 11)).tolist() for _ in range(8)]
    prepared = write_prepared(root / "prepared", sequences, N_ITEMS, IDS)
    torch.manual_seed(0)
    weights = models.save(models.build("recblr", N_ITEMS, d_model=16, n_layers=1), root / "model.pt")
    tracking.start_training_run(tracking.default_tracking_uri(root / "data" / "toy"), "toy", "2026-01-01", prepared)
    try:
        version = tracking.register(weights, prepared, "toy")
    finally:
        mlflow.end_run()
    return mlflow.pyfunc.load_model(f"models:/toy/{version}"), pd.read_parquet(prepared / "items.parquet")


def test_a_history_without_a_known_item_gets_the_most_popular_items_flagged_as_fallback(served):
    model, items = served
    out = model.predict(pd.DataFrame({"history": [["7", "14"], [], ["new-1", "new-2"]]}), params={"k": 5})
    assert list(out.columns) == ["item_ids", "scores", "fallback"]
    assert out["fallback"].tolist() == [False, True, True]
    popular = items.sort_values(["count", "item_idx"], ascending=[False, True]).head(5)
    for row in (1, 2):
        assert out["item_ids"][row] == popular["item_id"].tolist()
        np.testing.assert_allclose(out["scores"][row], popular["count"] / items["count"].sum())
    assert out["item_ids"][0] != popular["item_id"].tolist()  # a known history is the model's, not popularity


def test_integer_ids_are_the_ids_written_as_text(served):
    model, _ = served
    as_text = model.predict(pd.DataFrame({"history": [["7", "14", "21"], ["70"]]}))
    as_int = model.predict(pd.DataFrame({"history": [[7, 14, 21], np.array([70])]}))
    pd.testing.assert_frame_equal(as_int, as_text)
    assert not as_int["fallback"].any()


def test_k_below_one_is_refused_and_above_the_catalogue_ranks_it_all(served):
    model, _ = served
    with pytest.raises(MlflowException, match="k must be at least 1, got 0"):
        model.predict(pd.DataFrame({"history": [["7"]]}), params={"k": 0})
    out = model.predict(pd.DataFrame({"history": [["7"], []]}), params={"k": 100_000})
    assert [sorted(ids) for ids in out["item_ids"]] == [sorted(IDS)] * 2


def test_no_rows_give_no_rows_with_the_output_columns(served):
    model, _ = served
    out = model.predict(pd.DataFrame({"history": pd.Series([], dtype=object)}))
    assert list(out.columns) == ["item_ids", "scores", "fallback"] and len(out) == 0


@pytest.mark.parametrize("history, shown", [([7.0, 14], "got 7.0 (float)"), ([["7"]], "got ['7'] (list)"),
                                            (None, "expected a list of item ids")])
def test_a_malformed_history_is_refused_naming_its_row(served, history, shown):
    model, _ = served
    with pytest.raises(MlflowException, match=f"history of row 1: .*{re.escape(shown)}"):
        model.predict(pd.DataFrame({"history": [["7"], history]}))
