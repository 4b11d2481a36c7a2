"""Batch recommendation: the top-K next items of every user from a registered model version, to Parquet.

The version is resolved by alias (`recblr-<dataset>@champion`) in the MLflow registry; its weights and item map are
downloaded as plain files and loaded with `torch.load(weights_only=True)`, nothing is unpickled. Each
user's input is the whole prepared sequence (history + valid item + test item), cut to the most recent
`max_len` items the model was trained with, so the output is the item after the last one seen. Prepared
items are matched to the model's vocabulary by raw id: a champion trained on yesterday's data scores
today's users, items it never saw are left out of their inputs.

Users are ranked a chunk at a time (the chunk sized as in evaluation, so users x items never exceeds
`SCORE_BUDGET` floats where the scores are made) and each chunk is one Parquet row group, so memory does not
grow with the user count.
The file appears only when complete. mlflow is imported inside `recommend` alone: `top_k` runs wherever torch does.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import PipelineError
from pipeline.run import find_prepared
from recblr.data import Sequences, ids_by_index, load_prepared, vocabulary_lut
from recblr.evaluate import PRECISIONS, mask_seen, next_item_hidden, next_item_scores
from recblr.models import resolve_device

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                    ("score", pa.float32())])


def top_k(model: torch.nn.Module, seqs: Sequences, k: int, *, max_len: int, batch_size: int = 4096,
          exclude_history: bool = False, precision: str = "fp32",
          progress: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (rows, items (B, k), scores (B, k)) per chunk of users, best first; item 0 (padding) never.

    Ranked by `model.top_k` (on CUDA the fused score + top-k, no (B, n_items + 1) scores). With
    exclude_history every item of a user's whole sequence scores -inf, a mask per user over the full scores,
    so that path makes them and ranks with torch.topk; a user with fewer than k unseen items gets -inf in the
    tail, which callers drop. precision "bf16" runs the model under bf16 autocast; the scores are ranked in
    float32 either way (next_item_hidden).
    """
    n_scores = model.item_embedding.num_embeddings
    if not 1 <= k < n_scores:
        raise ValueError(f"k must be in 1..{n_scores - 1} (the model's item count), got {k}")
    chunking = dict(max_len=max_len, batch_size=batch_size, precision=precision, desc="recommend", progress=progress)
    if exclude_history:
        for rows, scores in next_item_scores(model, seqs, n_scores, **chunking):
            values, items = mask_seen(scores, seqs, rows).topk(k, dim=1)  # (B, k) each
            yield rows, items.cpu().numpy(), values.cpu().numpy()
        return
    for rows, hidden in next_item_hidden(model, seqs, n_scores, **chunking):
        items, values = model.top_k(hidden, k)  # (B, k) each
        yield rows, items.cpu().numpy(), values.cpu().numpy()


def write_recommendations(model: torch.nn.Module, seqs: Sequences, user_ids: np.ndarray, item_ids: np.ndarray,
                          out: Path, k: int, *, max_len: int, batch_size: int = 4096, exclude_history: bool = False,
                          precision: str = "fp32", progress: bool = True) -> int:
    """Write user_id, rank (1..k), item_id, score of every user to `out` atomically; return the row count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n_rows = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for rows, items, scores in top_k(model, seqs, k, max_len=max_len, batch_size=batch_size,
                                             exclude_history=exclude_history, precision=precision,
                                             progress=progress):
                keep = np.isfinite(scores)  # (B, k): only -inf tails of exclude_history are dropped
                user, rank = np.nonzero(keep)
                writer.write_table(pa.table({
                    "user_id": pa.array(user_ids[rows[user]], pa.string()),
                    "rank": pa.array(rank + 1, pa.int32()),
                    "item_id": pa.array(item_ids[items[keep]], pa.string()),
                    "score": pa.array(scores[keep], pa.float32()),
                }, schema=SCHEMA))
                n_rows += int(keep.sum())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return n_rows


def recommend(data_dir: Path, model_name: str | None = None, alias: str = "champion", k: int = 10,
              out: Path | None = None, device: str = "auto", batch_size: int = 4096, exclude_history: bool = False,
              precision: str = "fp32", tracking_uri: str | None = None, progress: bool = True) -> dict:
    """Top-k of every prepared user (`find_prepared`) from `model_name@alias`, written to `out` (default
    DATA_DIR/recommendations.parquet); returns users, k, output, seconds, users_per_s, model_version. model_name
    defaults to the dataset's own registered model (`tracking.registered_model_name`)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registered_model_name, resolve_tracking_uri
    from recblr.models import load, trained_max_len

    if precision not in PRECISIONS:
        raise PipelineError(f"precision must be fp32 or bf16, got {precision!r}")
    data_dir = Path(data_dir)
    model_name = registered_model_name(data_dir, model_name)
    prepared = find_prepared(data_dir)
    try:
        data = load_prepared(prepared)
    except (FileNotFoundError, ValueError) as err:
        raise PipelineError(str(err)) from err
    users_path = prepared / "users.parquet"
    if not users_path.is_file():
        raise PipelineError(f"{users_path}: missing; run `recblr prepare` first")
    user_ids = ids_by_index(users_path, "user_idx", "user_id")
    if len(user_ids) != data.n_users:
        raise PipelineError(f"{users_path}: {len(user_ids)} users but sequences.parquet has {data.n_users}")

    uri = resolve_tracking_uri(data_dir, tracking_uri, must_exist=True)  # reading: never create a store
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        others = sorted(m.name for m in client.search_registered_models(max_results=20))
        hint = f"; registered here: {', '.join(others)} (--model-name)" if others else ""
        raise PipelineError(f"no model version {model_name}@{alias} in {uri} ({err.message.splitlines()[0]}); "
                            f"`recblr run --data-dir {data_dir}` trains and registers one{hint}") from err
    out = Path(out) if out else data_dir / "recommendations.parquet"
    if out.is_dir():
        raise PipelineError(f"--out {out}: a folder; name the Parquet file to write")
    try:
        device = resolve_device(device)
    except ValueError as err:
        raise PipelineError(str(err)) from err
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version.version}",
                                                             dst_path=tmp))
        weights = model_dir / "artifacts" / "model.pt"
        model = load(weights).to(device)
        max_len = trained_max_len(weights) or 50
        item_ids = ids_by_index(model_dir / "artifacts" / "items.parquet")
    prepared_ids = ids_by_index(prepared / "items.parquet")
    lut = vocabulary_lut(prepared_ids, item_ids)
    inputs = data.history.append(data.valid_item).append(data.test_item).remap(lut)
    unknown_items = int((lut[1:] == 0).sum())
    no_known_items = int((np.diff(inputs.offsets) == 0).sum())
    if no_known_items == data.n_users:  # every user would get the same, popularity-like list
        raise PipelineError(f"none of {prepared}'s {len(prepared_ids) - 1} items is in the vocabulary of "
                            f"{model_name}@{alias} (version {version.version}): train a model on this data first")
    if no_known_items:
        log.warning("%d of %d users have no item that %s@%s knows: their lists do not depend on their history",
                    no_known_items, data.n_users, model_name, alias)
    started = time.perf_counter()
    try:
        n_rows = write_recommendations(model, inputs, user_ids, item_ids, out, k, max_len=max_len,
                                       batch_size=batch_size, exclude_history=exclude_history, precision=precision,
                                       progress=progress)
    except ValueError as err:
        raise PipelineError(f"{model_name}@{alias} (version {version.version}): {err}") from err
    seconds = time.perf_counter() - started
    return {"users": data.n_users, "k": k, "rows": n_rows, "output": str(out), "seconds": round(seconds, 3),
            "users_per_s": round(data.n_users / seconds, 1), "model_version": str(version.version),
            "model": f"{model_name}@{alias}", "prepared": str(prepared), "device": str(device), "max_len": max_len,
            "exclude_history": exclude_history, "precision": precision, "items_unknown_to_model": unknown_items,
            "users_without_known_items": no_known_items}
