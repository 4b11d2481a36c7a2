"""DuckDB for every data step: one connection recipe and the named SQL files under sql/ (SQL is code)."""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import duckdb

# sql/ sits beside the packages: the project is installed editable (Makefile, docker/), never as a wheel.
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
# A third of a 24 GB box leaves room for Python and the OS; DuckDB spills to disk beyond it.
# Insertion order is never relied on (every output that needs an order says ORDER BY), and keeping it costs memory.
CONFIG = {"memory_limit": "8GB", "threads": os.cpu_count() or 1, "preserve_insertion_order": False}


@cache
def sql(name: str) -> str:
    """The text of sql/NAME.sql."""
    return (SQL_DIR / f"{name}.sql").read_text()


def connect(spill_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the shared limits, spilling to spill_dir when given."""
    config = dict(CONFIG)
    if spill_dir is not None:
        config["temp_directory"] = str(spill_dir)
    con = duckdb.connect(config=config)
    con.execute("SET enable_progress_bar = false")  # each step shows its own tqdm bar
    return con
