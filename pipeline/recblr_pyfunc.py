"""The registered model's serving code: raw item-id histories in, top-K raw item ids and scores out.

MLflow logs this file as "model from code" (`mlflow.models.set_model` below), so loading the registered
model executes this source instead of unpickling a Python object, and the weights load through
`recblr.models.load` (torch.load with weights_only=True). Histories may have any length: the recurrent
model runs on the padded batch as is, nothing is traced or exported at a fixed shape.

A history with no item the model knows (empty, or only new ids) gives the model nothing to condition on: its
output there would be whatever the all-padding input happens to score. Such a row gets the most popular items of
the training data instead, with `fallback` True and their share of the training events as scores.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from mlflow.exceptions import MlflowException


def bad_input(message: str) -> MlflowException:
    # the scoring server passes an MlflowException's message on to the caller; any other error becomes a generic one
    return MlflowException.invalid_parameter_value(message)


class RecblrPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from recblr.models import load, trained_max_len

        self.model = load(context.artifacts["weights"]).eval()
        # histories are cut to the window the model was trained on, as in evaluation
        self.max_len = trained_max_len(context.artifacts["weights"]) or 0
        items = pq.read_table(context.artifacts["items"], columns=["item_idx", "item_id", "count"]).to_pandas()
        self.item_ids = np.empty(int(items["item_idx"].max()) + 1, dtype=object)  # index 0 is padding
        self.item_ids[items["item_idx"].to_numpy()] = items["item_id"].astype(str).to_numpy()
        self.item_idx = dict(zip(self.item_ids[1:], range(1, len(self.item_ids))))
        popular = items.sort_values(["count", "item_idx"], ascending=[False, True])
        self.popular = popular["item_idx"].to_numpy()
        self.popular_share = (popular["count"] / popular["count"].sum()).to_numpy()
        self.k = int((context.model_config or {}).get("k", 10))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        k = int((params or {}).get("k", self.k))
        if k < 1:
            raise bad_input(f"k must be at least 1, got {k}")
        k = min(k, len(self.item_ids) - 1)  # more than the catalogue: all of it, ranked
        rows = [self._known(b, h) for b, h in enumerate(model_input["history"])]
        fallback = np.array([not r for r in rows], dtype=bool)
        top = np.empty((len(rows), k), dtype=np.int64)
        scores = np.empty((len(rows), k))
        top[fallback], scores[fallback] = self.popular[:k], self.popular_share[:k]
        if not fallback.all():
            top[~fallback], scores[~fallback] = self._rank([r for r in rows if r], k)
        return pd.DataFrame({
            "item_ids": [list(self.item_ids[t]) for t in top],
            "scores": scores.tolist(),
            "fallback": fallback,
        })

    def _known(self, row: int, history) -> list[int]:
        """The model's indices of the items of a history it knows, the newest max_len of them, oldest first."""
        if not isinstance(history, (list, np.ndarray)):  # the schema lets None through
            raise bad_input(f"history of row {row}: expected a list of item ids ([] for none), got {history!r}")
        known = []
        for item in history:
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, (str, int, np.integer)):
                raise bad_input(f"history of row {row}: item ids are strings or integers, got {item!r} "
                                f"({type(item).__name__})")
            # an unknown item (not in the training vocabulary) carries no signal for the model: it is dropped
            if (idx := self.item_idx.get(str(item))) is not None:
                known.append(idx)
        return known[-self.max_len:] if self.max_len else known

    def _rank(self, rows: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's top k (items, scores), (B, k) each, after each non-empty row of item indices."""
        lengths = torch.tensor([len(r) for r in rows])
        items = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # (B, T) right-padded with 0
        for b, r in enumerate(rows):
            items[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.no_grad():
            hidden = self.model(items)  # (B, T, D)
            last = hidden[torch.arange(len(rows)), lengths - 1]  # (B, D)
            top, scores = self.model.top_k(last, k)  # (B, K) each, padding never recommended
        return top.numpy(), scores.numpy()


mlflow.models.set_model(RecblrPyfunc())
