"""prepare: the SQL k-core against a plain-Python fixed point, ordering and split, ids, atomic write, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from pipeline import prepare as prepare_module
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.ingest import ingest
from pipeline.prepare import prepare

BEAUTY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon-beauty" / "Beauty.txt"


def write_events(data_dir: Path, events: list[tuple[str, str, int]]) -> Path:
    """events.parquet as ingest writes it; `row` is the position in the list, 1-based.

    The file holds the rows in reverse, so that no result can come from the file's physical order.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    users, items, stamps = zip(*events) if events else ((), (), ())
    pq.write_table(pa.table({
        "row": pa.array(range(1, len(events) + 1), pa.int64()),
        "user_id": pa.array(users, pa.string()),
        "item_id": pa.array(items, pa.string()),
        "timestamp": pa.array(stamps, pa.int64()),
        "rating": pa.nulls(len(events), pa.float64()),
        "behavior": pa.nulls(len(events), pa.string()),
    }).take(pa.array(range(len(events) - 1, -1, -1), pa.int64())), data_dir / "events.parquet")
    return data_dir


def read_prepared(data_dir: Path) -> tuple[dict[str, list[str]], pa.Table, pa.Table, pa.Table]:
    """({raw user: raw items in order}, sequences, items, users) read back through the id maps."""
    out = data_dir / "prepared"
    seqs, items, users = (pq.read_table(out / f"{name}.parquet") for name in ("sequences", "items", "users"))
    item_id = dict(zip(items["item_idx"].to_pylist(), items["item_id"].to_pylist()))
    user_id = dict(zip(users["user_idx"].to_pylist(), users["user_id"].to_pylist()))
    by_user = {
        user_id[u]: [item_id[i] for i in hist + [valid, test]]
        for u, hist, valid, test in zip(*(seqs[c].to_pylist() for c in ("user_idx", "history", "valid_item", "test_item")))
    }
    return by_user, seqs, items, users


def python_kcore(events: list[tuple[str, str, int]], k: int) -> dict[str, list[str]]:
    """The k-core by repeated removal, then each user's items ordered by (timestamp, row)."""
    kept = list(enumerate(events, start=1))
    while True:
        users, items = Counter(e[0] for _, e in kept), Counter(e[1] for _, e in kept)
        left = [(r, e) for r, e in kept if users[e[0]] >= k and items[e[1]] >= k]
        if len(left) == len(kept):
            break
        kept = left
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for r, (u, i, t) in kept:
        by_user.setdefault(u, []).append((t, r, i))
    return {u: [i for _, _, i in sorted(seq)] for u, seq in by_user.items()}


event_lists = st.lists(
    st.tuples(st.sampled_from("abcdefg"), st.sampled_from("pqrstuvw"), st.integers(0, 4)), max_size=80
)


@settings(max_examples=60, deadline=None)
@given(events=event_lists, k=st.integers(3, 5))
def test_kcore_order_and_split_match_python(events, k):
    expected = python_kcore(events, k)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_events(Path(tmp), events)
        if not expected:
            with pytest.raises(PipelineError, match="nothing survives" if events else "events file is empty"):
                prepare(data_dir, min_count=k)
            return
        result = prepare(data_dir, min_count=k)
        got, seqs, items, _ = read_prepared(data_dir)
    assert got == expected
    assert result["interactions"] == sum(map(len, expected.values())) == sum(items["count"].to_pylist())
    assert result["users"] == len(expected) == seqs.num_rows
    assert result["items"] == len({i for seq in expected.values() for i in seq}) == items.num_rows


def test_split_breaks_timestamp_ties_by_row(tmp_path):
    # user u: timestamps 5, 1, 1, 3, 1 at rows 1..5 -> order by (timestamp, row): rows 2, 3, 5, 4, 1;
    # users v and w give every item the 3 events the 3-core needs
    events = [("u", "a", 5), ("u", "b", 1), ("u", "c", 1), ("u", "d", 3), ("u", "e", 1)]
    events += [(u, i, 10 + t) for u in "vw" for t, i in enumerate("abcde")]
    prepare(write_events(tmp_path, events), min_count=3)
    seqs = pq.read_table(tmp_path / "prepared" / "sequences.parquet")
    items = pq.read_table(tmp_path / "prepared" / "items.parquet")
    idx = dict(zip(items["item_id"].to_pylist(), items["item_idx"].to_pylist()))
    row = seqs.to_pylist()[0]  # u's first event is the earliest, so u is user 0
    assert row["history"] == [idx["b"], idx["c"], idx["e"]]
    assert (row["valid_item"], row["test_item"]) == (idx["d"], idx["a"])


def test_ids_are_dense_deterministic_and_typed(tmp_path):
    # three users, three items; item counts 5, 4, 3 after the 3-core; user y's first event is earliest
    events = [("x", "p", 10), ("x", "p", 11), ("x", "q", 12), ("y", "q", 1), ("y", "r", 2), ("y", "p", 3),
              ("z", "r", 20), ("z", "p", 21), ("z", "q", 22), ("z", "r", 23), ("x", "p", 13)]
    prepare(write_events(tmp_path / "a", events), min_count=3)
    _, seqs, items, users = read_prepared(tmp_path / "a")
    assert items["item_idx"].to_pylist() == [1, 2, 3]
    assert items["item_id"].to_pylist() == ["p", "q", "r"]  # count desc (5, 3, 3), then raw id
    assert items["count"].to_pylist() == [5, 3, 3]
    assert users["user_idx"].to_pylist() == [0, 1, 2]
    assert users["user_id"].to_pylist() == ["y", "x", "z"]  # by first event
    assert seqs["user_idx"].to_pylist() == [0, 1, 2]
    assert seqs.schema.field("history").type == pa.list_(pa.int32())
    for name in ("user_idx", "valid_item", "test_item"):
        assert seqs.schema.field(name).type == pa.int32()
    assert items.schema.field("item_idx").type == pa.int32() and users.schema.field("user_idx").type == pa.int32()
    # the same events in another file order give the same ids (only `row` changes, and no ties depend on it)
    prepare(write_events(tmp_path / "b", events[::-1]), min_count=3)
    _, seqs_b, items_b, users_b = read_prepared(tmp_path / "b")
    assert (items_b, users_b, seqs_b) == (items, users, seqs)


def test_summary_json_holds_the_counts(tmp_path):
    events = [(u, i, t) for t, (u, i) in enumerate((u, i) for u in "abcd" for i in "pqrs")] + [("e", "p", 99)]
    result = prepare(write_events(tmp_path, events), min_count=4)
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert {k: summary[k] for k in ("users", "items", "interactions")} == \
        {k: result[k] for k in ("users", "items", "interactions")} == {"users": 4, "items": 4, "interactions": 16}
    assert (summary["events_in"], summary["users_in"], summary["items_in"], summary["min_count"]) == (17, 5, 4, 4)
    assert result["output"] == str(tmp_path / "prepared")


def test_failed_run_keeps_the_previous_output_and_no_temp_files(tmp_path, monkeypatch):
    data_dir = write_events(tmp_path, [(u, i, 0) for u in "abc" for i in "pqr"])
    prepare(data_dir, min_count=3)
    before = {p.name: p.read_bytes() for p in (data_dir / "prepared").iterdir()}

    real_build = prepare_module._build

    def build_then_fail(*args):
        real_build(*args)  # every file is written into the staging folder ...
        raise RuntimeError("disk full")  # ... and then the run dies before the swap

    monkeypatch.setattr(prepare_module, "_build", build_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(data_dir, min_count=3)
    assert {p.name: p.read_bytes() for p in (data_dir / "prepared").iterdir()} == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["events.parquet", "prepared"]


def test_rerun_replaces_prepared_whole(tmp_path):
    data_dir = write_events(tmp_path, [(u, i, 0) for u in "abc" for i in "pqr"])
    (data_dir / "prepared").mkdir()
    (data_dir / "prepared" / "stale.txt").write_text("from an older run")
    prepare(data_dir, min_count=3)
    assert sorted(p.name for p in (data_dir / "prepared").iterdir()) == \
        ["items.parquet", "sequences.parquet", "summary.json", "users.parquet"]
    assert sorted(p.name for p in data_dir.iterdir()) == ["events.parquet", "prepared"]


def test_missing_events_says_to_run_ingest(tmp_path):
    with pytest.raises(PipelineError, match=r"events\.parquet not found: run `recblr ingest"):
        prepare(tmp_path)


def test_nothing_surviving_names_the_counts_and_suggests_lower_min_count(tmp_path):
    data_dir = write_events(tmp_path, [("a", "p", 0), ("a", "q", 1), ("b", "p", 2)])
    with pytest.raises(PipelineError, match=r"3 events, 2 users, 2 items.*lower --min-count"):
        prepare(data_dir, min_count=3)
    assert not (data_dir / "prepared").exists()


def test_empty_events_say_ingest_quarantined_every_row_not_lower_min_count(tmp_path):
    data_dir = write_events(tmp_path, [])  # what ingest leaves when it quarantines every row
    with pytest.raises(PipelineError, match=r"events\.parquet: the events file is empty: ingest quarantined every "
                                            r"row \(see .*quarantine\.parquet") as err:
        prepare(data_dir, min_count=3)
    assert "--min-count" not in str(err.value)
    assert not (data_dir / "prepared").exists()


def test_bad_min_count_and_missing_columns(tmp_path):
    data_dir = write_events(tmp_path, [("a", "p", 0)])
    with pytest.raises(PipelineError, match="--min-count must be >= 3"):
        prepare(data_dir, min_count=2)
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["p"]}), data_dir / "events.parquet")
    with pytest.raises(PipelineError, match=r"events\.parquet: missing column\(s\) row, timestamp"):
        prepare(data_dir)


@pytest.mark.parametrize("command", ["prepare", "run"])
def test_cli_refuses_a_min_count_below_the_split_before_any_step(tmp_path, monkeypatch, command):
    from pipeline import run

    monkeypatch.setattr(prepare_module, "prepare", lambda *args, **kwargs: pytest.fail("prepare was called"))
    monkeypatch.setattr(run, "run_pipeline", lambda *args, **kwargs: pytest.fail("run_pipeline was called"))
    below = prepare_module.MIN_EVENTS_PER_USER - 1
    result = CliRunner().invoke(app, [command, "--data-dir", str(tmp_path), "--min-count", str(below)])
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert f"'--min-count': Input should be greater than or equal to {below + 1}" in message


def test_cli_prints_json_last_and_exits_2_on_user_errors(tmp_path):
    data_dir = write_events(tmp_path, [(u, i, 0) for u in "abc" for i in "pqr"])
    result = CliRunner().invoke(app, ["prepare", "--data-dir", str(data_dir), "--min-count", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"users": 3, "items": 3, "interactions": 9, "output": str(data_dir / "prepared")}
    # main() turns a PipelineError into exit code 2 with the message on stderr
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "prepare",
                           "--data-dir", str(tmp_path / "empty")], capture_output=True, text=True)
    assert proc.returncode == 2 and "recblr ingest" in proc.stderr


@pytest.mark.skipif(not BEAUTY.exists(), reason="needs ../shared/data/amazon-beauty")
def test_amazon_beauty_is_already_5_core(tmp_path):
    assert ingest(BEAUTY, "sequences", tmp_path)["rows_quarantined"] == 0
    result = prepare(tmp_path, min_count=5)
    assert (result["users"], result["items"], result["interactions"]) == (22_363, 12_101, 198_502)
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert summary["kcore_rounds"] == 1  # nothing to remove: one round finds the fixed point
