"""The synthetic default log: seeded, well-formed where it should be, damaged where it should be, and
sequential enough that a first-order Markov baseline clearly beats popularity after ingest and prepare."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.ingest import ingest
from pipeline.prepare import prepare
from pipeline.synthetic import HEADER, MALFORMED_ROWS, check_synthetic, generate_events, write_synthetic_log


def test_same_seed_same_bytes_other_seed_other_log(tmp_path):
    a = write_synthetic_log(tmp_path / "a.csv", n_users=300, n_items=200, seed=3).read_bytes()
    b = write_synthetic_log(tmp_path / "b.csv", n_users=300, n_items=200, seed=3).read_bytes()
    c = write_synthetic_log(tmp_path / "c.csv", n_users=300, n_items=200, seed=4).read_bytes()
    assert a == b and a != c


@pytest.mark.parametrize("settings, bad", [
    ({"users": 300}, "synthetic setting(s) users unknown"),
    ({"n_users": "300"}, "synthetic setting n_users='300' is not an integer >= 1"),
    ({"n_items": 300.0}, "synthetic setting n_items=300.0 is not an integer >= 2"),
    ({"mean_events": True}, "synthetic setting mean_events=True is not an integer >= 3"),
    ({"n_users": 300, "seed": -1}, "synthetic setting seed=-1 is not an integer >= 0"),
])
def test_a_bad_setting_is_named_with_what_the_log_takes(tmp_path, settings, bad):
    with pytest.raises(PipelineError) as raised:
        check_synthetic(settings)
    assert str(raised.value).startswith(bad)
    assert str(raised.value).endswith("takes n_users (an integer >= 1), n_items (an integer >= 2), "
                                      "seed (an integer >= 0), mean_events (an integer >= 3)")
    if "unknown" not in bad:  # generating checks the same, whoever calls it
        with pytest.raises(PipelineError, match="is not an integer"):
            write_synthetic_log(tmp_path / "log.csv", **settings)


def test_good_settings_pass_as_they_are():
    assert check_synthetic(None) == {}
    assert check_synthetic({"n_users": 300, "seed": np.int64(3)}) == {"n_users": 300, "seed": 3}


def test_clean_events_are_plausible():
    n_users, n_items, mean = 1_000, 500, 20
    events = generate_events(n_users, n_items, seed=1, mean_events=mean)
    assert events.column_names == list(HEADER)
    assert abs(events.num_rows - n_users * mean) < 0.1 * n_users * mean
    assert pc.count_distinct(events["user_id"]).as_py() == n_users
    assert pc.count_distinct(events["item_id"]).as_py() <= n_items
    rating = events["rating"].to_numpy()
    assert rating.min() >= 1 and rating.max() <= 5 and len(np.unique(rating)) == 5
    stamps = events["timestamp"].to_numpy()
    assert (np.diff(stamps) >= 0).all()  # the log is in time order
    users = events["user_id"].to_numpy(zero_copy_only=False)
    order = np.argsort(users, kind="stable")  # each user's events, still in file order
    same_user = users[order][1:] == users[order][:-1]
    assert (np.diff(stamps[order])[same_user] > 0).all()  # strictly increasing per user: no ties to guess
    # popularity is skewed: the top 10% of items hold far more than 10% of the events
    counts = np.sort(np.unique(events["item_id"].to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()


def test_file_has_header_then_clean_rows_then_one_row_per_damage(tmp_path):
    path = write_synthetic_log(tmp_path / "log.csv", n_users=50, n_items=100, seed=0)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(HEADER)
    clean, damaged = lines[1:-MALFORMED_ROWS], lines[-MALFORMED_ROWS:]
    assert all(len(line.split(",")) == 4 and line.split(",")[2].isdigit() and line.split(",")[0] for line in clean)
    fields = [line.split(",") for line in damaged]
    assert damaged[0] in clean  # an exact duplicate
    assert any(not f[2].isdigit() for f in fields if len(f) == 4)  # a non-numeric timestamp
    assert any(f[0] == "" for f in fields)  # an empty user id
    assert any(len(f) == 3 for f in fields)  # a missing column


def hit_rate_at_10(scores: np.ndarray, targets: np.ndarray) -> float:
    """scores (U, N+1) with column 0 the padding id; a hit when fewer than 10 items score above the target."""
    scores = scores.astype(np.float64)
    scores[:, 0] = -np.inf
    target = scores[np.arange(len(targets)), targets]
    return float(((scores > target[:, None]).sum(axis=1) < 10).mean())


def test_markov_beats_popularity_after_ingest_and_prepare(tmp_path):
    log = write_synthetic_log(tmp_path / "raw" / "log.csv", n_users=2_000, n_items=1_000, seed=0, mean_events=20)
    summary = ingest(log, "csv", tmp_path)
    assert summary["rows_quarantined"] == MALFORMED_ROWS
    assert {"column_count", "user_id_not_null", "duplicate_event"} <= set(summary["quarantine_reasons"])
    n_items = prepare(tmp_path)["items"]

    seqs = pq.read_table(tmp_path / "prepared" / "sequences.parquet")
    inputs = [h + [v] for h, v in zip(seqs["history"].to_pylist(), seqs["valid_item"].to_pylist())]
    test = seqs["test_item"].to_numpy()
    # both baselines see only the test inputs (history + validation item), never a test item
    flat = np.concatenate(inputs)
    popularity = np.bincount(flat, minlength=n_items + 1)
    transitions = np.zeros((n_items + 1, n_items + 1), dtype=np.int64)
    for seq in inputs:
        np.add.at(transitions, (seq[:-1], seq[1:]), 1)
    last = np.array([seq[-1] for seq in inputs])
    # Markov: most frequent successors of the last item, popularity breaking ties (and filling empty rows)
    markov = transitions[last] + popularity / (popularity.max() + 1)
    pop = np.broadcast_to(popularity, (len(last), n_items + 1))

    markov_hr, pop_hr = hit_rate_at_10(markov, test), hit_rate_at_10(pop, test)
    assert markov_hr > 2 * pop_hr and markov_hr - pop_hr > 0.1, (markov_hr, pop_hr)
