"""A seeded synthetic interaction log with real sequential structure: the project's embedded default data.

Items fall into interest clusters with Zipf popularity inside each, every item has a few likely successors,
and users drift between clusters now and then. The next item therefore depends on the last one, so a
first-order Markov baseline beats popularity by a wide margin (tests/test_synthetic.py checks it): a
sequence model has something real to learn. A handful of malformed rows is appended so that the default
run exercises the quarantine path.

Generation is vectorised over users and loops only over positions, so 10M events take a few seconds.
"""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from pipeline.errors import PipelineError

HEADER = ("user_id", "item_id", "timestamp", "rating")
CLUSTER_SIZE = 100  # items per interest cluster, on average
ZIPF_ITEM = 1.1  # popularity skew of items inside a cluster
ZIPF_CLUSTER = 0.8  # popularity skew of the clusters themselves
SUCCESSOR_P = np.array([0.6, 0.25, 0.15])  # each item's likely successors, most likely first
P_FOLLOW = 0.35  # the next item is one of the last item's successors
P_DRIFT = 0.08  # the user moves to another interest cluster before picking the next item
RATING_P = np.array([0.05, 0.1, 0.2, 0.35, 0.3])  # ratings 1..5
START = 1_577_836_800  # 2020-01-01 UTC; users join during the following year
MEAN_GAP_S = 6 * 3600
MALFORMED_ROWS = 4  # appended after the clean rows; see _malformed_lines
SETTINGS = {"n_users": 1, "n_items": 2, "seed": 0, "mean_events": 3}  # the log's settings and the least each takes


def check_synthetic(settings: dict | None) -> dict:
    """`settings` (a DAG conf's or `recblr run`'s) as write_synthetic_log's keyword arguments. An unknown name, or a
    value that is not an integer at or above its least, raises a PipelineError naming it and what the log takes:
    a DAG run then fails at once instead of retrying a TypeError from inside the generator."""
    settings = dict(settings or {})
    takes = ", ".join(f"{name} (an integer >= {least})" for name, least in SETTINGS.items())
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise PipelineError(f"synthetic setting(s) {', '.join(unknown)} unknown; the synthetic log takes {takes}")
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < SETTINGS[name]:
            raise PipelineError(f"synthetic setting {name}={value!r} is not an integer >= {SETTINGS[name]}; "
                                f"the synthetic log takes {takes}")
    return settings


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return np.cumsum(w) / w.sum()


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    # min() guards against the last cdf value rounding to just below 1.0
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def generate_events(n_users: int = 6_000, n_items: int = 3_000, seed: int = 0, mean_events: int = 50) -> pa.Table:
    """The clean events, one row per interaction in global time order: user_id, item_id, timestamp, rating."""
    check_synthetic({"n_users": n_users, "n_items": n_items, "seed": seed, "mean_events": mean_events})
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_items // CLUSTER_SIZE)
    # item j is the (j // n_clusters)-th most popular item of cluster j % n_clusters
    max_rank = -(-n_items // n_clusters)
    item_cdf, cluster_cdf = _zipf_cdf(max_rank, ZIPF_ITEM), _zipf_cdf(n_clusters, ZIPF_CLUSTER)

    def item_in(clusters: np.ndarray) -> np.ndarray:
        items = clusters + _draw(item_cdf, rng, len(clusters)) * n_clusters
        return np.where(items >= n_items, items - n_clusters, items)  # the last rank is missing in some clusters

    # successors are uniform within the item's cluster, so they are not simply the popular items
    cluster_of = np.arange(n_items) % n_clusters
    size_of = np.bincount(cluster_of, minlength=n_clusters)
    k = len(SUCCESSOR_P)
    successors = cluster_of[:, None] + (rng.random((n_items, k)) * size_of[cluster_of, None]).astype(np.int64) * n_clusters
    successor_cdf = np.cumsum(SUCCESSOR_P)

    # users sorted by length, longest first, so the users still active at position t are a prefix
    lengths = np.sort(2 + rng.geometric(1.0 / (mean_events - 2), n_users))[::-1]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    items = np.empty(int(lengths.sum()), dtype=np.int64)
    cluster = _draw(cluster_cdf, rng, n_users)
    last = item_in(cluster)
    items[offsets] = last
    for t in tqdm(range(1, int(lengths[0])), desc="synthetic", unit=" positions", leave=False, disable=None):
        n = int(np.count_nonzero(lengths > t))
        u = rng.random(n)
        drift = (u >= P_FOLLOW) & (u < P_FOLLOW + P_DRIFT)
        cluster[:n][drift] = _draw(cluster_cdf, rng, int(drift.sum()))
        follow = successors[last[:n], np.minimum(np.searchsorted(successor_cdf, rng.random(n), side="right"), k - 1)]
        last = np.where(u < P_FOLLOW, follow, item_in(cluster[:n]))
        items[offsets[:n] + t] = last

    # strictly increasing timestamps per user: a start in the first year, then gaps of >= 1 s
    user = np.repeat(rng.permutation(n_users), lengths)  # raw user numbers unrelated to length
    gaps = 1 + rng.exponential(MEAN_GAP_S, len(items)).astype(np.int64)
    gaps[offsets] = START + rng.integers(0, 365 * 86_400, n_users)
    ends = np.cumsum(gaps)
    timestamp = ends - np.repeat(ends[offsets] - gaps[offsets], lengths)
    rating = 1 + _draw(np.cumsum(RATING_P), rng, len(items))

    # a log arrives in time order, not grouped by user; the stable sort keeps each user's order on ties
    order = np.argsort(timestamp, kind="stable")
    user_names = pa.array([f"u{i}" for i in range(n_users)])
    item_names = pa.array([f"i{i}" for i in rng.permutation(n_items)])  # raw ids hide the cluster layout
    return pa.table({
        "user_id": user_names.take(pa.array(user[order])),
        "item_id": item_names.take(pa.array(items[order])),
        "timestamp": pa.array(timestamp[order]),
        "rating": pa.array(rating[order].astype(np.int8)),
    })


def _malformed_lines(events: pa.Table) -> list[str]:
    """One row per kind of damage the ingest step must quarantine, built from real users and items."""
    u, i, ts, r = (events.column(name)[0].as_py() for name in HEADER)
    return [
        f"{u},{i},{ts},{r}",  # an exact duplicate of the first data row
        f"{u},{i},not-a-time,{r}",  # a non-numeric timestamp
        f",{i},{ts + 1},{r}",  # an empty user id
        f"{u},{i},{ts + 2}",  # a missing column
    ]


def write_synthetic_log(path: Path | str, n_users: int = 6_000, n_items: int = 3_000, seed: int = 0,
                        mean_events: int = 50) -> Path:
    """Write the synthetic raw log as CSV (header user_id,item_id,timestamp,rating) and return its path.

    About n_users * mean_events clean rows in time order, then MALFORMED_ROWS damaged rows at the end.
    The same arguments give the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events = generate_events(n_users, n_items, seed, mean_events)
    with path.open("wb") as f:
        f.write((",".join(HEADER) + "\n").encode())  # pyarrow would quote the header's names
        pacsv.write_csv(events, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        f.write(("\n".join(_malformed_lines(events)) + "\n").encode())
    return path
