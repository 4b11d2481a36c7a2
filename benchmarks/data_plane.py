"""Data-plane benchmark: ingest, validate, 5-core and split of N synthetic events, timed step by step.

    .venv/bin/python benchmarks/data_plane.py --events 10000000

Generates the synthetic log (not counted in the four steps), runs pipeline.ingest.ingest (which calls
pipeline.validate.validate: that call is timed apart, and ingest is the rest) and pipeline.prepare.prepare
(5-core = its load + k-core stages, split = ids, order and the Parquet writes, from its summary.json).
Peak memory is the process's resident set, sampled every 20 ms from /proc (Linux), taken as the maximum
inside each step's time window; CPU seconds (all threads) come from the same samples, so that a run on a
busy machine can be told from a slow step. Prints a table and writes benchmarks/out/data_plane.json. Goal: the four
steps together under 60 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

import pipeline.ingest
from pipeline.prepare import prepare
from pipeline.synthetic import write_synthetic_log

OUT = Path(__file__).resolve().parent / "out" / "data_plane.json"
GOAL_S = 60.0
PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """(perf_counter, resident bytes, process CPU seconds) every `every` seconds until done is set."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        with open("/proc/self/statm") as statm:
            while not self.done.is_set():
                statm.seek(0)
                self.samples.append((time.perf_counter(), int(statm.read().split()[1]) * PAGE, time.process_time()))
                self.done.wait(self.every)

    def peak_mb(self, start: float, end: float) -> float:
        inside = [rss for t, rss, _ in self.samples if start <= t <= end]
        return round(max(inside, default=0) / 2**20, 1)

    def cpu_s(self, start: float, end: float) -> float:
        def at(moment: float) -> float:
            return max((cpu for t, _, cpu in self.samples if t <= moment), default=0.0)
        return round(at(end) - at(start), 2)


def run(events: int, work: Path) -> dict:
    sampler = RssSampler()
    sampler.start()
    windows = {}

    t0 = time.perf_counter()
    log = write_synthetic_log(work / "raw" / "synthetic.csv", n_users=max(1, events // 50),
                              n_items=max(2, events // 100))
    windows["generate"] = (t0, time.perf_counter())

    # time validate apart by wrapping the reference ingest calls it through
    real_validate = pipeline.ingest.validate

    def timed_validate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_validate(*args, **kwargs)
        finally:
            windows["validate"] = (start, time.perf_counter())

    pipeline.ingest.validate = timed_validate
    try:
        t0 = time.perf_counter()
        ingested = pipeline.ingest.ingest(log, "csv", work)
    finally:
        pipeline.ingest.validate = real_validate
    windows["ingest"] = (t0, windows["validate"][0])  # parsing and staging come before validate; the little after it is noise

    t0 = time.perf_counter()
    prepared = prepare(work, min_count=5)
    t1 = time.perf_counter()
    summary = json.loads((work / "prepared" / "summary.json").read_text())
    stage = summary["seconds"]
    kcore_end = t0 + stage["load"] + stage["kcore"]
    windows["5-core"] = (t0, kcore_end)
    windows["split"] = (kcore_end, t1)
    sampler.done.set()
    sampler.join()

    rows = {"generate": ingested["rows_in"], "ingest": ingested["rows_in"], "validate": ingested["rows_in"],
            "5-core": summary["events_in"], "split": prepared["interactions"]}
    steps = []
    for name in ("generate", "ingest", "validate", "5-core", "split"):
        start, end = windows[name]
        seconds = end - start
        steps.append({"step": name, "rows": rows[name], "seconds": round(seconds, 2),
                      "rows_per_s": round(rows[name] / seconds), "cpu_s": sampler.cpu_s(start, end),
                      "peak_rss_mb": sampler.peak_mb(start, end)})
    four = [s for s in steps if s["step"] != "generate"]
    return {
        "events": events,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "duckdb": duckdb.__version__},
        "steps": steps,
        "four_steps_seconds": round(sum(s["seconds"] for s in four), 2),
        "four_steps_cpu_s": round(sum(s["cpu_s"] for s in four), 2),
        "goal_seconds": GOAL_S,
        "four_steps_peak_rss_mb": max(s["peak_rss_mb"] for s in four),
        "rows_kept": ingested["rows_kept"], "rows_quarantined": ingested["rows_quarantined"],
        "users": prepared["users"], "items": prepared["items"], "interactions": prepared["interactions"],
        "kcore_rounds": summary["kcore_rounds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="about this many synthetic events")
    parser.add_argument("--work-dir", type=Path, help="keep the data here (default: a temporary folder)")
    args = parser.parse_args()
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = run(args.events, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="data_plane-") as work:
            result = run(args.events, Path(work))

    table = Table(title=f"data plane, {result['events']:,} synthetic events, {result['machine']['cpus']} CPUs")
    for column in ("step", "rows", "seconds", "rows/s", "CPU s", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for s in result["steps"]:
        table.add_row(s["step"], f"{s['rows']:,}", f"{s['seconds']:.2f}", f"{s['rows_per_s']:,}", f"{s['cpu_s']:.2f}",
                      f"{s['peak_rss_mb']:,.0f}")
    table.add_row("4 steps", "", f"{result['four_steps_seconds']:.2f}", "", f"{result['four_steps_cpu_s']:.2f}",
                  f"{result['four_steps_peak_rss_mb']:,.0f}")
    Console().print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
