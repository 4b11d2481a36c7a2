"""The registered model's serving code: raw item-id histories in, top-K raw item ids and scores out.

MLflow logs this file as "model from code" (`mlflow.models.set_model` below), so loading the registered
model executes this source instead of unpickling a Python object, and the weights load through
`recblr.models.load` (torch.load with weights_only=True). Histories may have any length: the recurrent
model runs on the padded batch as is, nothing is traced or exported at a fixed shape.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch


class RecblrPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from recblr.models import load, trained_max_len

        self.model = load(context.artifacts["weights"]).eval()
        # histories are cut to the window the model was trained on, as in evaluation
        self.max_len = trained_max_len(context.artifacts["weights"]) or 0
        items = pq.read_table(context.artifacts["items"], columns=["item_idx", "item_id"]).to_pandas()
        self.item_ids = np.empty(int(items["item_idx"].max()) + 1, dtype=object)  # index 0 is padding
        self.item_ids[items["item_idx"].to_numpy()] = items["item_id"].astype(str).to_numpy()
        self.item_idx = dict(zip(self.item_ids[1:], range(1, len(self.item_ids))))
        self.k = int((context.model_config or {}).get("k", 10))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        k = min(int((params or {}).get("k") or self.k), len(self.item_ids) - 1)
        # Unknown items (not in the training vocabulary) carry no signal for the model: drop them.
        rows = [[self.item_idx[i] for i in map(str, h) if i in self.item_idx] for h in model_input["history"]]
        rows = [r[-self.max_len:] if self.max_len else r for r in rows]
        lengths = torch.tensor([max(len(r), 1) for r in rows])
        items = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # (B, T) right-padded with 0
        for b, r in enumerate(rows):
            items[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.no_grad():
            hidden = self.model(items)  # (B, T, D)
            last = hidden[torch.arange(len(rows)), lengths - 1]  # (B, D)
            top, scores = self.model.top_k(last, k)  # (B, K) each, padding never recommended
        return pd.DataFrame({
            "item_ids": [list(self.item_ids[t]) for t in top.numpy()],
            "scores": [list(map(float, s)) for s in scores.numpy()],
        })


mlflow.models.set_model(RecblrPyfunc())
