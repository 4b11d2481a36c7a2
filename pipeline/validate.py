"""validate: split staged rows into DATA_DIR/events.parquet and DATA_DIR/quarantine.parquet.

The per-row rules are the great-expectations suite in pipeline/expectations/events.json, the one place
their names, columns and bounds are kept. Each is a column-map expectation, whose verdict on a row depends
only on that row's value in one column, so GX checks each column's distinct values (in pandas batches of at
most BATCH_ROWS, result_format COMPLETE, failing rows from unexpected_index_list) instead of every row: a
10M-row log has a few hundred thousand distinct ids. The failing values are then mapped back to rows in one
streaming pass; a row that breaks several rules is quarantined under the first in suite order.

Structural rules (column_count, utf8_text, unbalanced_quote) arrive already set by ingest, as does
timestamp_in_range for a number that no int64 holds or a datetime before 1677 or after 2262, which cannot be
staged for the suite; the whole-table rule, duplicate_event, runs in DuckDB (sql/validate_*.sql), which writes
the quarantine; the events are the other staged rows, copied in one streaming pass. Every staged row lands in
exactly one of the two files, written under temporary names and renamed at the end.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from duckdb import DuckDBPyConnection
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.duck import connect, sql

SUITE_PATH = Path(__file__).resolve().parent / "expectations" / "events.json"
BATCH_ROWS = 1_000_000
# What ingest stages: the event columns, then `raw`, and the structural `rule` and `detail` (null for rows that
# still have to pass the suite). `raw` is null for a text source, whose quarantine ingest rewrites afterwards with
# each row's line read back from the file; for a Parquet source, which has no lines, it is the row's values,
# staged only for rows sure to be quarantined.
STAGING_SCHEMA = pa.schema([
    ("row", pa.int64()), ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
    ("rating", pa.float64()), ("behavior", pa.string()), ("raw", pa.string()), ("rule", pa.string()),
    ("detail", pa.string()),
])
EVENTS_SCHEMA = pa.schema([STAGING_SCHEMA.field(n) for n in ("row", "user_id", "item_id", "timestamp", "rating", "behavior")])
STRUCTURAL_RULES = ("column_count", "utf8_text", "unbalanced_quote")  # set by pipeline.ingest
DUPLICATE_RULE = "duplicate_event"  # set by sql/validate_quarantine.sql
COLUMN_MAP_EXPECTATIONS = {  # the per-value kinds that checking distinct values is exact for
    "expect_column_values_to_not_be_null", "expect_column_values_to_match_regex",
    "expect_column_values_to_be_between", "expect_column_values_to_be_in_set",
    "expect_column_values_to_not_match_regex", "expect_column_value_lengths_to_be_between",
}


@cache
def load_suite() -> dict:
    """The suite as stored: {"name", "meta": {"parameter_defaults": ...}, "expectations": [...]}."""
    suite = json.loads(SUITE_PATH.read_text())
    for spec in suite["expectations"]:
        if spec["type"] not in COLUMN_MAP_EXPECTATIONS or spec["kwargs"]["column"] not in STAGING_SCHEMA.names:
            raise ValueError(f"{SUITE_PATH}: {spec['meta']['rule']} must be a per-value expectation on a staged "
                             f"column ({', '.join(sorted(COLUMN_MAP_EXPECTATIONS))})")
    return suite


def rule_names() -> tuple[str, ...]:
    """Every quarantine rule, in the order a row is checked."""
    return STRUCTURAL_RULES + tuple(e["meta"]["rule"] for e in load_suite()["expectations"]) + (DUPLICATE_RULE,)


def suite_parameters(id_kind: str = "token", rating_min: float | None = None, rating_max: float | None = None,
                     now: int | None = None) -> dict:
    """Values for the suite's $PARAMETERs: the id pattern of the format, timestamps up to now + 1 day, the
    rating bounds (None: the suite's defaults)."""
    defaults = load_suite()["meta"]["parameter_defaults"]
    if f"id_regex_{id_kind}" not in defaults:
        raise ValueError(f"id_kind must be 'token' or 'numeric', got {id_kind!r}")
    rating_min = defaults["rating_min"] if rating_min is None else rating_min
    rating_max = defaults["rating_max"] if rating_max is None else rating_max
    if not rating_min <= rating_max:
        raise ValueError(f"rating range must have min <= max, got [{rating_min}, {rating_max}]")
    now = int(time.time()) if now is None else now
    return {
        "id_regex": defaults[f"id_regex_{id_kind}"],
        "timestamp_min": defaults["timestamp_min"],
        "timestamp_max": now + 86_400 * defaults["timestamp_max_days_ahead"],
        "rating_min": float(rating_min),
        "rating_max": float(rating_max),
    }


@cache  # one GX context per process: building it costs about a second, every validate call can share it
def _validation_definitions() -> dict:
    """One GX validation definition per checked column, holding that column's expectations in suite order."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # ~5 s to import: only when validating
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # ours is the one on stderr
    asset = context.data_sources.add_pandas("staging").add_dataframe_asset("values")
    batch = asset.add_batch_definition_whole_dataframe("batch")
    suite = load_suite()
    definitions = {}
    for column in dict.fromkeys(e["kwargs"]["column"] for e in suite["expectations"]):
        part = ExpectationSuite(name=f"{suite['name']}.{column}", meta=suite["meta"],
                                expectations=[e for e in suite["expectations"] if e["kwargs"]["column"] == column])
        definitions[column] = context.validation_definitions.add(
            gx.ValidationDefinition(name=part.name, data=batch, suite=context.suites.add(part)))
    return definitions


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    # Numbers stay Arrow-backed: numpy float64 would turn the NaN of an unparseable rating into a null, which
    # range rules skip (Arrow keeps NaN a value, outside any range), and nullable int64 into floats.
    return table.to_pandas(types_mapper=lambda t: None if pa.types.is_string(t) else pd.ArrowDtype(t))


def _failing_values(con: DuckDBPyConnection, staging: Path, params: dict, bar: tqdm) -> dict:
    """{column: (values, rank, detail)} for the distinct values of each column that break a rule, with the
    rank (suite position) and message of the first rule they break."""
    expectations = load_suite()["expectations"]
    rank_of = {e["meta"]["rule"]: i for i, e in enumerate(expectations)}
    failing = {}
    for column, definition in _validation_definitions().items():
        distinct = con.sql(sql("validate_distinct"), params={"staging": str(staging), "column": column}).to_arrow_table()
        values, ranks, details = [], [], []
        for start in range(0, distinct.num_rows, BATCH_ROWS):
            chunk = distinct.slice(start, BATCH_ROWS)
            frame = _to_pandas(chunk)
            result = definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                                    result_format={"result_format": "COMPLETE"})
            seen = np.zeros(chunk.num_rows, dtype=bool)
            ranked = sorted((rank_of[r.expectation_config.meta["rule"]], r) for r in result.results)
            for rank, outcome in ranked:  # in suite order: the first rule a value breaks is its rule
                spec = outcome.expectation_config
                if outcome.exception_info.get("raised_exception"):
                    raise RuntimeError(f"GX expectation {spec.meta['rule']} failed to run: "
                                       f"{outcome.exception_info.get('exception_message')}")
                if outcome.success:
                    continue
                index = np.asarray(outcome.result["unexpected_index_list"], dtype=np.int64)
                index = index[~seen[index]]
                seen[index] = True
                value = chunk.column(0).combine_chunks().take(pa.array(index))
                text = spec.meta["detail"].format(**{k: params[v["$PARAMETER"]] if isinstance(v, dict) else v
                                                     for k, v in expectations[rank]["kwargs"].items()})
                got = pc.fill_null(pc.binary_join_element_wise("; got '", pc.cast(value, pa.string()), "'", ""), "")
                values.append(value)
                ranks.append(np.full(len(index), rank))
                details.append(pc.binary_join_element_wise(text, got, ""))
            bar.update(chunk.num_rows)
        if values:
            failing[column] = (pa.concat_arrays(values), pa.array(np.concatenate(ranks)), pa.concat_arrays(details))
    return failing


def _failures(staging: Path, failing: dict) -> pa.Table:
    """(ord, rule, detail) of every staged row without a structural rule whose value in some column fails:
    ord is the row's 0-based position in the staging file."""
    names = np.array([e["meta"]["rule"] for e in load_suite()["expectations"]], dtype=object)
    ords, rules, details = [], [], []
    offset = 0
    for batch in pq.ParquetFile(staging).iter_batches(batch_size=BATCH_ROWS, columns=list(failing) + ["rule"]):
        best_rank = np.full(batch.num_rows, len(names))
        best_detail = pa.nulls(batch.num_rows, pa.string())
        for column, (values, ranks, texts) in failing.items():
            at = pc.index_in(batch.column(column), value_set=values, skip_nulls=False)
            rank = pc.fill_null(ranks.take(at), len(names)).to_numpy()
            better = rank < best_rank
            if better.any():
                best_rank = np.where(better, rank, best_rank)
                best_detail = pc.if_else(pa.array(better), texts.take(at), best_detail)
        bad = (best_rank < len(names)) & batch.column("rule").is_null().to_numpy(zero_copy_only=False)
        index = np.flatnonzero(bad)
        ords.append(index + offset)
        rules.append(names[best_rank[index]])
        details.append(best_detail.take(pa.array(index)))
        offset += batch.num_rows
    return pa.table({"ord": pa.array(np.concatenate(ords) if ords else [], pa.int64()),
                     "rule": pa.array(np.concatenate(rules) if rules else [], pa.string()),
                     "detail": pa.concat_arrays(details) if details else pa.array([], pa.string())})


def _write_events(staging: Path, dropped: np.ndarray, output: Path) -> int:
    """Copy the staged rows whose position is not in `dropped` (sorted) to the events file, streaming.

    Staged rows that can become events are in source order (ingest appends the rows it rejects itself after
    each batch), so the events come out in source order without a sort.
    """
    kept, offset = 0, 0
    with pq.ParquetWriter(output, EVENTS_SCHEMA) as writer:
        for batch in pq.ParquetFile(staging).iter_batches(batch_size=BATCH_ROWS, columns=EVENTS_SCHEMA.names):
            ords = np.arange(offset, offset + batch.num_rows)
            keep = np.searchsorted(dropped, ords, side="left") == np.searchsorted(dropped, ords, side="right")
            writer.write_batch(batch.filter(pa.array(keep)))
            kept += int(keep.sum())
            offset += batch.num_rows
    return kept


def validate(staging: Path, data_dir: Path, *, source: str, id_kind: str = "token", rating_min: float | None = None,
             rating_max: float | None = None, now: int | None = None) -> dict:
    """Check the staged rows (STAGING_SCHEMA) and write events.parquet and quarantine.parquet into data_dir.

    source names the raw file in the quarantine's `source` column. Returns rows_in (staged rows), rows_kept,
    rows_quarantined, quarantine_reasons {rule: count} and output (the events file's path).
    """
    staging, data_dir = Path(staging), Path(data_dir)
    rows_in = pq.ParquetFile(staging).metadata.num_rows
    params = suite_parameters(id_kind, rating_min, rating_max, now)
    events, quarantine = data_dir / "events.parquet", data_dir / "quarantine.parquet"
    tag = uuid.uuid4().hex[:8]
    events_tmp, quarantine_tmp = data_dir / f".events-{tag}.parquet", data_dir / f".quarantine-{tag}.parquet"
    try:
        with connect() as con:
            with tqdm(unit=" values", unit_scale=True, desc="validate", leave=False) as bar:
                failing = _failing_values(con, staging, params, bar)
            con.register("failures", _failures(staging, failing))
            con.execute(sql("validate_quarantine"), {"staging": str(staging)})
            reasons = dict(con.execute(sql("validate_reasons")).fetchall())
            (quarantined,) = con.execute(sql("validate_write_quarantine"),
                                         {"source": source, "output": str(quarantine_tmp)}).fetchall()[0]
            dropped = con.execute(sql("validate_dropped")).fetchnumpy()["ord"]
        kept = _write_events(staging, dropped, events_tmp)
        if kept + quarantined != rows_in:
            raise RuntimeError(f"validate lost rows: {kept} kept + {quarantined} quarantined != {rows_in} staged")
        os.replace(events_tmp, events)
        os.replace(quarantine_tmp, quarantine)
    finally:
        events_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
    return {"rows_in": rows_in, "rows_kept": kept, "rows_quarantined": quarantined,
            "quarantine_reasons": reasons, "output": str(events)}
