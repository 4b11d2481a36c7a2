"""The `recblr` command line: one subcommand per pipeline step, each a thin call into pipeline/ or recblr/.

Every subcommand takes --json and then prints one JSON object as the last line of stdout; otherwise it
prints a human-readable summary. Errors a user can fix (bad input files, missing data) exit with code 2 and
one line on stderr naming what is wrong.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)

DataDir = typer.Option(Path("data/default"), "--data-dir", help="Folder for this dataset's files.")
AsJson = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")


def emit(summary: dict, as_json: bool, title: str) -> None:
    """Print a step's summary: a JSON line for machines, a two-column table for people."""
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        return
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def prepare(
    data_dir: Path = DataDir,
    min_count: int = typer.Option(5, "--min-count", help="Keep users and items with at least this many events (k-core)."),
    as_json: bool = AsJson,
) -> None:
    """Filter events to the k-core, index users and items, and split each user's sequence leave-one-out."""
    from pipeline.prepare import prepare as run_prepare

    emit(run_prepare(data_dir, min_count=min_count), as_json, "prepare")


@app.command()
def compare(
    data_dir: Path = DataDir,
    models: str = typer.Option("recblr,sasrec,gru4rec,lrurec,pop", "--models", help="Comma-separated registry names."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epoch cap per model (default: train's)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Most recent items a model reads."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout for every model that has one."),
    set_: list[str] = typer.Option([], "--set", help="MODEL.FIELD=VALUE config override, repeatable."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    as_json: bool = AsJson,
) -> None:
    """Train and evaluate several models on one prepared dataset: a table, a bar chart, MLflow runs."""
    from pipeline.compare import METRICS, compare as run_compare
    from pipeline.errors import PipelineError

    overrides: dict = {}
    for item in set_:
        key, sep, value = item.partition("=")
        model, dot, field = key.partition(".")
        if not (sep and dot and model and field):
            raise PipelineError(f"--set {item!r}: expected MODEL.FIELD=VALUE, e.g. sasrec.n_layers=3")
        try:
            overrides.setdefault(model, {})[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides.setdefault(model, {})[field] = value
    summary = run_compare(data_dir, [m.strip() for m in models.split(",") if m.strip()], epochs=epochs,
                          max_len=max_len, dropout=dropout, overrides=overrides, tracking_uri=tracking_uri)
    if as_json:
        emit(summary, True, "compare")
        return
    table = Table(title=f"compare: {summary['output']} (best: {summary['best']})")
    for column in ["model", *METRICS]:
        table.add_column(column.replace("_at_", "@"))
    for row in summary["rows"]:
        table.add_row(row["model"], *(f"{row[k]:.4f}" for k in METRICS))
    Console().print(table)


def main() -> None:
    from pipeline.errors import PipelineError

    try:
        app()
    except PipelineError as err:
        console.print(f"[red]error:[/red] {err}")
        raise SystemExit(2)
