"""prepare: k-core filter, dense ids, chronological order and the leave-one-out split, in DuckDB SQL.

Reads DATA_DIR/events.parquet and writes DATA_DIR/prepared/ (sequences, items, users, summary.json; see
the README's data contracts). The statements live in sql/prepare_*.sql. Ids are deterministic: items
1..N by count descending then raw id (0 is padding), users 0..U-1 by first event (timestamp, then source
row, then raw id). Each user's events are ordered by timestamp with ties broken by source row; the last
item is the test target, the second-last the validation target, the rest the training history, as in the
paper. The output is built in a temporary folder and renamed into place, so a failed run leaves the
previous prepared/ (or none), never a half-written one.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from duckdb import DuckDBPyConnection
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.duck import connect, sql
from pipeline.errors import PipelineError

EVENT_COLUMNS = ("row", "user_id", "item_id", "timestamp")
MIN_EVENTS_PER_USER = 3  # history, validation target, test target


def _check_events(events: Path, data_dir: Path) -> None:
    if not events.is_file():
        raise PipelineError(f"{events} not found: run `recblr ingest --data-dir {data_dir}` first")
    try:
        names = set(pq.read_schema(events).names)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise PipelineError(f"{events}: not a readable Parquet file ({err}); run `recblr ingest` again") from None
    missing = [c for c in EVENT_COLUMNS if c not in names]
    if missing:
        raise PipelineError(f"{events}: missing column(s) {', '.join(missing)}; run `recblr ingest` again")
    if pq.read_metadata(events).num_rows == 0:  # no --min-count can help: the source needs fixing
        raise PipelineError(f"{events}: the events file is empty: ingest quarantined every row (see "
                            f"{data_dir / 'quarantine.parquet'} for each row's rule)")


def _build(con: DuckDBPyConnection, events: Path, out: Path, min_count: int, bar: tqdm) -> dict:
    seconds = {}
    start = time.perf_counter()
    con.execute(sql("prepare_load"), {"events": str(events)})
    events_in, users_in, items_in = con.execute(sql("prepare_counts")).fetchall()[0]
    seconds["load"] = time.perf_counter() - start
    bar.update()

    start, rows, rounds, deleted = time.perf_counter(), events_in, 0, None
    while deleted != 0:
        (deleted,) = con.execute(sql("prepare_kcore"), {"k": min_count}).fetchall()[0]
        rows, rounds = rows - deleted, rounds + 1
        bar.set_postfix(kcore_round=rounds, events=rows)
    seconds["kcore"] = time.perf_counter() - start
    bar.update()
    if rows == 0:
        raise PipelineError(
            f"{events}: nothing survives the {min_count}-core filter ({events_in} events, {users_in} users, "
            f"{items_in} items before it); try a lower --min-count"
        )

    start = time.perf_counter()
    con.execute(sql("prepare_items"))
    con.execute(sql("prepare_users"))
    con.execute(sql("prepare_write_sequences"), {"path": str(out / "sequences.parquet")})
    con.execute(sql("prepare_write_items"), {"path": str(out / "items.parquet")})
    con.execute(sql("prepare_write_users"), {"path": str(out / "users.parquet")})
    seconds["split"] = time.perf_counter() - start
    bar.update()
    n_users, n_items = (pq.read_metadata(out / f"{name}.parquet").num_rows for name in ("users", "items"))
    return {
        "users": n_users, "items": n_items, "interactions": rows, "min_count": min_count,
        "kcore_rounds": rounds, "events_in": events_in, "users_in": users_in, "items_in": items_in,
        "source": str(events), "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _swap_in(staged: Path, target: Path) -> None:
    """Replace target with staged by renames; the old copy is parked beside staged (and deleted with it)."""
    parked = staged.with_name("previous")
    if target.exists():
        target.rename(parked)
    try:
        staged.rename(target)
    except OSError:
        if parked.exists():
            parked.rename(target)
        raise


def prepare(data_dir: Path, min_count: int = 5) -> dict:
    """Filter DATA_DIR/events.parquet to its min_count-core, index it and split it into DATA_DIR/prepared/.

    Returns {"users", "items", "interactions", "output"}; prepared/summary.json holds these and more
    (rounds of the k-core filter, counts before it, seconds per stage).
    """
    data_dir = Path(data_dir)
    if min_count < MIN_EVENTS_PER_USER:
        raise PipelineError(
            f"--min-count must be >= {MIN_EVENTS_PER_USER} (got {min_count}): the leave-one-out split needs "
            "a history, a validation item and a test item per user"
        )
    events = data_dir / "events.parquet"
    _check_events(events, data_dir)
    target = data_dir / "prepared"
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=data_dir) as work:
        staged = Path(work) / "prepared"
        staged.mkdir()
        con = connect(spill_dir=Path(work) / "spill")
        try:
            with tqdm(total=3, desc="prepare", unit="stage", disable=None) as bar:
                summary = _build(con, events, staged, min_count, bar)
        finally:
            con.close()
        (staged / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _swap_in(staged, target)
    return {"users": summary["users"], "items": summary["items"], "interactions": summary["interactions"],
            "output": str(target)}
