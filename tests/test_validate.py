"""validate: the GX suite's rules, first-rule-wins, duplicates, the row balance and atomic output."""
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import validate as v

NOW = 1_700_000_000
GOOD = ("u1", "i1", 1_600_000_000, 4.0, None)


def stage(tmp_path, rows, name="staging.parquet"):
    """Write staging rows: (row, user, item, timestamp, rating, behavior[, raw, rule, detail])."""
    rows = [tuple(r) + (None,) * (9 - len(r)) for r in rows]
    path = tmp_path / name
    pq.write_table(pa.table(list(zip(*rows)), schema=v.STAGING_SCHEMA), path)
    return path


def run(tmp_path, rows, **kwargs):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    summary = v.validate(stage(tmp_path, rows), out, source="src.csv", now=NOW, **kwargs)
    quarantine = {r["row"]: r for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    return summary, pq.read_table(out / "events.parquet"), quarantine


def test_suite_names_every_rule_once_with_a_message():
    suite = json.loads(v.SUITE_PATH.read_text())
    rules = [e["meta"]["rule"] for e in suite["expectations"]]
    assert len(rules) == len(set(rules))
    assert all(e["meta"]["detail"] for e in suite["expectations"])
    assert v.rule_names() == ("column_count", "utf8_text", "unbalanced_quote", *rules, "duplicate_event")


@pytest.mark.parametrize("kind", ["token", "numeric"])
def test_suite_parameters_fill_every_placeholder(kind):
    params = v.suite_parameters(kind, now=NOW)
    placeholders = {val["$PARAMETER"] for e in v.load_suite()["expectations"] for val in e["kwargs"].values()
                    if isinstance(val, dict)}
    assert placeholders <= set(params)
    assert params["timestamp_max"] == NOW + 86_400
    with pytest.raises(ValueError, match="id_kind"):
        v.suite_parameters("float")
    with pytest.raises(ValueError, match="min <= max"):
        v.suite_parameters(rating_min=5, rating_max=1)


def test_each_rule_quarantines_its_row_and_the_rest_is_kept(tmp_path):
    rows = [
        (1, *GOOD),
        (2, None, "i1", 1_600_000_001, 4.0, None),
        (3, "u 2", "i1", 1_600_000_002, 4.0, None),  # whitespace inside an id
        (4, "u2", None, 1_600_000_003, 4.0, None),
        (5, "u2", "i\x01", 1_600_000_004, 4.0, None),
        (6, "u2", "i2", None, 4.0, None, "u2,i2,yesterday,4"),
        (7, "u2", "i2", -5, 4.0, None),
        (8, "u2", "i2", NOW + 2 * 86_400, 4.0, None),  # more than a day in the future
        (9, "u2", "i2", 1_600_000_005, 11.0, None),
        (10, "u2", "i2", 1_600_000_006, math.nan, None, "u2,i2,1600000006,abc"),
        (11, "u2", "i2", 1_600_000_007, math.inf, None),
        (12, "u2", "i2", 1_600_000_008, None, "buy"),  # a missing rating is fine
        (13, *GOOD),  # an exact copy of row 1
        (14, None, None, None, None, None, "1,2", "column_count", "expected 4 fields, found 2"),
        (15, "u1", "i1", 1_600_000_000, 4.0, "pv"),  # differs from row 1 in behavior: not a duplicate
    ]
    summary, events, quarantine = run(tmp_path, rows)
    expected = {2: "user_id_not_null", 3: "user_id_well_formed", 4: "item_id_not_null", 5: "item_id_well_formed",
                6: "timestamp_parses", 7: "timestamp_in_range", 8: "timestamp_in_range", 9: "rating_in_range",
                10: "rating_in_range", 11: "rating_in_range", 13: "duplicate_event", 14: "column_count"}
    assert {row: q["rule"] for row, q in quarantine.items()} == expected
    assert events.column("row").to_pylist() == [1, 12, 15]
    assert summary["rows_in"] == len(rows) == summary["rows_kept"] + summary["rows_quarantined"]
    assert summary["quarantine_reasons"]["rating_in_range"] == 3
    assert quarantine[6]["raw"] == "u2,i2,yesterday,4"  # what ingest staged, not the parsed values
    assert quarantine[9]["raw"].startswith("u2,i2,1600000005,11")
    assert "row 1" in quarantine[13]["detail"] and "got '11'" in quarantine[9]["detail"]
    assert {q["source"] for q in quarantine.values()} == {"src.csv"}


def test_a_row_breaking_several_rules_gets_the_first_in_suite_order(tmp_path):
    _, _, quarantine = run(tmp_path, [(1, *GOOD), (2, "bad id", None, -1, 99.0, None)])
    assert quarantine[2]["rule"] == "user_id_well_formed"


def test_numeric_ids_and_a_custom_rating_range(tmp_path):
    rows = [(1, "10", "20", 1_600_000_000, 1.0, None), (2, "u10", "20", 1_600_000_001, 1.0, None),
            (3, "10", "21", 1_600_000_002, 7.0, None)]
    _, events, quarantine = run(tmp_path, rows, id_kind="numeric", rating_min=1, rating_max=5)
    assert events.column("row").to_pylist() == [1]
    assert {r: q["rule"] for r, q in quarantine.items()} == {2: "user_id_well_formed", 3: "rating_in_range"}


def test_the_first_occurrence_of_a_duplicate_stays_whatever_the_staging_order(tmp_path):
    rows = [(9, *GOOD), (4, *GOOD), (7, *GOOD), (5, "u1", "i1", 1_600_000_000, None, None),
            (6, "u1", "i1", 1_600_000_000, None, None)]
    _, events, quarantine = run(tmp_path, rows)
    assert events.column("row").to_pylist() == [4, 5]  # in source order
    assert {r: q["rule"] for r, q in quarantine.items()} == {6: "duplicate_event", 7: "duplicate_event",
                                                             9: "duplicate_event"}


def test_a_failure_leaves_the_previous_output_and_no_temporary_file(tmp_path, monkeypatch):
    summary, _, _ = run(tmp_path, [(1, *GOOD)])
    before = (tmp_path / "out" / "events.parquet").read_bytes()

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(v, "_failures", broken)
    with pytest.raises(OSError):
        v.validate(stage(tmp_path, [(1, *GOOD), (2, *GOOD)]), tmp_path / "out", source="src.csv", now=NOW)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["events.parquet", "quarantine.parquet"]
    assert (tmp_path / "out" / "events.parquet").read_bytes() == before
