"""Writes DATA_DIR/prepared/ straight from item sequences, so model tests need neither DuckDB nor ingest; `ragged`
holds such sequences in memory, as recblr.data.Sequences."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recblr.data import Sequences


def write_prepared(prepared_dir: Path, sequences: list[list[int]], n_items: int,
                   item_ids: list[str] | None = None) -> Path:
    """sequences: each user's items 1..n_items, oldest first, at least two each (the contract's split);
    item_ids: the raw id of items 1..n_items (default i1, i2, ...)."""
    prepared_dir = Path(prepared_dir)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "user_idx": pa.array(range(len(sequences)), pa.int32()),
        "history": pa.array([s[:-2] for s in sequences], pa.list_(pa.int32())),
        "valid_item": pa.array([s[-2] for s in sequences], pa.int32()),
        "test_item": pa.array([s[-1] for s in sequences], pa.int32()),
    }), prepared_dir / "sequences.parquet")
    counts = np.bincount(np.concatenate([np.asarray(s) for s in sequences]), minlength=n_items + 1)
    pq.write_table(pa.table({
        "item_idx": pa.array(range(1, n_items + 1), pa.int32()),
        "item_id": pa.array(item_ids or [f"i{k}" for k in range(1, n_items + 1)]),
        "count": pa.array(counts[1:], pa.int64()),
    }), prepared_dir / "items.parquet")
    return prepared_dir


def markov_sequences(n_users: int, n_items: int, length: int, seed: int = 0) -> list[list[int]]:
    """Each next item is mostly the last one + 1 (mod n_items): learnable, and popularity cannot guess it."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n_users):
        seq = [int(rng.integers(1, n_items + 1))]
        for _ in range(length - 1):
            follow = rng.random() < 0.9
            seq.append(seq[-1] % n_items + 1 if follow else int(rng.integers(1, n_items + 1)))
        sequences.append(seq)
    return sequences


def ragged(seqs: list[list[int]]) -> Sequences:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return Sequences(np.array([i for s in seqs for i in s], dtype=np.int64), offsets)
