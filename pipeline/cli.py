"""The `recblr` command line: one subcommand per pipeline step, each a thin call into pipeline/ or recblr/.

Every subcommand takes --json and then prints one JSON object as the last line of stdout; otherwise it
prints a human-readable summary. Errors a user can fix (bad input files, missing data) exit with code 2 and
one line on stderr naming what is wrong; under --json, stdout's last line is then {"error": that line}. A value or
option the command line itself refuses exits 2 with typer's usage and message on stderr, and under --json with
{"error": that message} too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.prepare import MIN_EVENTS_PER_USER

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)

DataDir = typer.Option(Path("data/default"), "--data-dir", help="Folder for this dataset's files.")
AsJson = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")
TrackingUri = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                           help="Default: SQLite under the data root.")
ModelName = typer.Option(None, "--model-name",
                         help="Registered model name (default recblr-<DATA_DIR's name>: one per dataset).")
MinCount = typer.Option(5, "--min-count", min=MIN_EVENTS_PER_USER,
                        help="k of the k-core filter: keep users and items with at least this many events.")
# ingest's options, which `recblr run` passes on to its ingest step
Format = typer.Option("csv", "--format", help="movielens, recbole, csv (CSV/TSV/Parquet), taobao or sequences.")
UserCol = typer.Option(None, "--user-col", help="Header name of the user id (csv, recbole).")
ItemCol = typer.Option(None, "--item-col", help="Header name of the item id (csv, recbole).")
TimeCol = typer.Option(None, "--time-col", help="Header name of the timestamp: Unix seconds or ISO 8601.")
RatingCol = typer.Option(None, "--rating-col", help="Header name of the rating (optional).")
BehaviorCol = typer.Option(None, "--behavior-col", help="Header name of the behavior (optional).")
Delimiter = typer.Option(None, "--delimiter", help="csv field separator, e.g. ',' or '\\t'; default: sniffed.")
Behaviors = typer.Option(None, "--behaviors",
                         help="Keep only these behaviors, e.g. buy,cart (taobao; csv and recbole with a behavior column).")
RatingMin = typer.Option(None, "--rating-min", help="Lowest valid rating (default 0).")
RatingMax = typer.Option(None, "--rating-max", help="Highest valid rating (default 10).")


def format_options(**options) -> dict:
    """The ingest options given on the command line; the others stay the format's defaults."""
    return {key: value for key, value in options.items() if value is not None}


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
def ingest(
    source: Optional[Path] = typer.Argument(None, help="Raw log; omitted: generate the synthetic log into DATA_DIR/raw."),
    fmt: str = Format,
    data_dir: Path = DataDir,
    user_col: Optional[str] = UserCol,
    item_col: Optional[str] = ItemCol,
    time_col: Optional[str] = TimeCol,
    rating_col: Optional[str] = RatingCol,
    behavior_col: Optional[str] = BehaviorCol,
    delimiter: Optional[str] = Delimiter,
    behaviors: Optional[str] = Behaviors,
    rating_min: Optional[float] = RatingMin,
    rating_max: Optional[float] = RatingMax,
    as_json: bool = AsJson,
) -> None:
    """Read a raw log, validate it, and write DATA_DIR/events.parquet plus the rejected rows in quarantine.parquet."""
    from pipeline.ingest import ingest as run_ingest

    options = format_options(user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col,
                             behavior_col=behavior_col, delimiter=delimiter, behaviors=behaviors,
                             rating_min=rating_min, rating_max=rating_max)
    emit(run_ingest(source, fmt, data_dir, **options), as_json, "ingest")


@app.command()
def prepare(
    data_dir: Path = DataDir,
    min_count: int = MinCount,
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
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = AsJson,
) -> None:
    """Train and evaluate several models on one prepared dataset: a table, a bar chart, MLflow runs."""
    from pipeline.compare import METRICS, compare as run_compare
    from pipeline.errors import PipelineError

    overrides: dict = {}
    form = "MODEL.FIELD=VALUE, e.g. sasrec.n_layers=3"
    for key, value in _parse_sets(set_, form).items():
        model, dot, field = key.partition(".")
        if not (dot and model and field):
            raise PipelineError(f"--set {key!r}: expected {form}")
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


def _parse_sets(items: list[str], form: str = "FIELD=VALUE, e.g. n_layers=1") -> dict:
    """--set KEY=VALUE pairs; VALUE as JSON when it parses (numbers, true/false), else as a string."""
    from pipeline.errors import PipelineError

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key):
            raise PipelineError(f"--set {item!r}: expected {form}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@app.command()
def train(
    data_dir: Path = DataDir,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Checkpoints and model.pt (default DATA_DIR/runs/MODEL)."),
    model: str = typer.Option("recblr", "--model", help="Registry name: recblr, sasrec, gru4rec, lrurec, pop."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epoch cap (default 300 on a GPU, 4 on a CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 256 (the paper: 2048 prefixes)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 2e-3; the paper: 1e-3)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW decay of weight matrices and the item table (default 0, as the paper)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Default 0.1 (the paper: 0)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Most recent items a model reads (default 50)."),
    regime: Optional[str] = typer.Option(None, "--regime", help="all (default: loss at every position) or prefix (the paper's)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Epochs without a better valid NDCG@10 (default 10)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:1..."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (default) or bf16 (autocast, training and evaluation)."),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="Users per scoring chunk in evaluation (default 4096)."),
    time_budget_s: Optional[float] = typer.Option(None, "--time-budget-s", help="Start no epoch that would end past this many seconds; the best epoch so far is the result."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training forward (default off; it turns the CUDA graph off): 1.15x faster epochs on long windows after a compile of about 40 s, slower where the CUDA graph applies; for long runs on long windows."),
    recompute: Optional[bool] = typer.Option(None, "--recompute/--no-recompute", help="Keep only each block's input and re-run the block in the backward (RecBLR, LRURec: in spans of 128 positions, of 2^18 positions where steps run eagerly; default off): RecBLR at T=1000 on an H100 peaks at 0.19x the GPU memory for 1.8x the time; for long sequences."),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay each training step from a CUDA graph (default on, DDP ranks included; not with --compile): the host issues one launch a step instead of hundreds."),
    batch_by_length: Optional[bool] = typer.Option(None, "--batch-by-length/--no-batch-by-length", help="Batch windows of similar length together (default off): less padding, so faster epochs where lengths vary."),
    set_: list[str] = typer.Option([], "--set", help="Model config override FIELD=VALUE, repeatable (e.g. dropout=0.5)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN_DIR/checkpoint.pt."),
    as_json: bool = AsJson,
) -> None:
    """Train a model on DATA_DIR/prepared with early stopping; print the best model's test metrics.

    Multi-GPU: `torchrun --nproc-per-node N -m pipeline.cli train ...` (DDP, same global --batch-size); only
    rank 0 prints. `recblr run --nproc-per-node N` launches it that way.
    """
    from pipeline.errors import Interrupted, PipelineError
    from pipeline.run import train_config
    from recblr.train import OutOfGPUMemory, TrainingDiverged, fit

    # the pipeline builds its TrainConfig the same way: None leaves a field to TrainConfig's default
    cfg = train_config({"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                        "label_smoothing": label_smoothing, "max_len": max_len, "regime": regime,
                        "patience": patience, "seed": seed, "device": device, "precision": precision,
                        "eval_batch_size": eval_batch_size, "time_budget_s": time_budget_s, "compile": compile,
                        "recompute": recompute, "cuda_graph": cuda_graph, "batch_by_length": batch_by_length})
    run_dir = run_dir or data_dir / "runs" / model
    finished = []  # epochs whose checkpoint fit has written: what a Ctrl-C leaves to resume from
    try:
        result = fit(data_dir / "prepared", run_dir, model, overrides=_parse_sets(set_), train=cfg, resume=resume,
                     on_epoch=lambda epoch, record: finished.append(epoch))
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(run_dir / "checkpoint.pt", finished, resume)) from None
    except (FileNotFoundError, ValueError, OutOfGPUMemory, TrainingDiverged) as err:
        raise PipelineError(str(err)) from err
    if result is None:  # a DDP rank other than 0: rank 0 reports
        return
    emit({**result["test"], "valid": result["valid"], "model": model, "regime": result["train"]["regime"],
          "epochs": result["epochs"], "best_epoch": result["best_epoch"], "stopped": result["stopped"],
          "seconds": round(result["seconds"], 1), "model_path": result["model_path"]}, as_json, "train (test metrics of the best epoch)")


def _interrupted(checkpoint: Path, finished: list[int], resumed: bool) -> str:
    go_on = "continue with `recblr train ... --resume` (the same options)"
    if finished:
        return f"interrupted after epoch {finished[-1]}; its checkpoint is {checkpoint}: {go_on}"
    if resumed:
        return f"interrupted before an epoch finished; {checkpoint} is still the one this run resumed from: {go_on}"
    return "interrupted before the first epoch finished, so there is no checkpoint to resume: run `recblr train` again"


@app.command()
def evaluate(
    data_dir: Path = DataDir,
    model: Optional[str] = typer.Option(None, "--model", help="The model `recblr train --model NAME` saved, "
                                        "DATA_DIR/runs/NAME/model.pt (default recblr); after `recblr run`, the "
                                        "partition's model, checked to be NAME."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="A saved model file (default: as --model "
                                              "says)."),
    popularity: bool = typer.Option(False, "--popularity", help="Rank by training popularity instead of a saved model."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    remove_history: bool = typer.Option(False, "--remove-history", help="Drop items the user already has from the ranking."),
    max_len: Optional[int] = typer.Option(None, "--max-len", min=1, help="Default: the max length the model was trained with."),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = AsJson,
) -> None:
    """Leave-one-out full-ranking HR/NDCG/MRR at 10 and 20 of a trained model or the popularity baseline."""
    from pipeline.errors import PipelineError
    from pipeline.run import find_prepared
    from recblr.data import load_prepared
    from recblr.evaluate import evaluate as run_evaluate
    from recblr.models import build, load, model_name, resolve_device, trained_max_len

    chosen = [option for option, value in (("--model", model), ("--model-path", model_path)) if value is not None]
    if popularity and chosen:
        raise PipelineError(f"--popularity ranks by training popularity, not a saved model: drop {' and '.join(chosen)}"
                            " or --popularity")
    try:
        device = resolve_device(device)
        prepared = find_prepared(data_dir)
        data = load_prepared(prepared)
        if popularity:
            net, trained_len = build("pop", data.n_items), None
            net.fit_counts(data.item_counts())
        else:
            if prepared == data_dir / "prepared":
                path = model_path or data_dir / "runs" / (model or "recblr") / "model.pt"
            else:  # a `recblr run` partition keeps its model beside its prepared data
                path = model_path or prepared.parent / "model" / "model.pt"
            try:
                net, trained_len = load(path), trained_max_len(path)
            except FileNotFoundError as err:
                trained = sorted(p.parent.name for p in (data_dir / "runs").glob("*/model.pt"))
                raise PipelineError(f"{err}; pick one with --model NAME (trained here: {', '.join(trained) or 'none'})"
                                    " or --model-path FILE") from err
            if model is not None and model_name(net) != model:
                raise PipelineError(f"{path} holds a {model_name(net)} model, not --model {model}; leave --model out "
                                    "or pick the file with --model-path")
        metrics = run_evaluate(net.to(device), data, split, remove_history=remove_history,
                               max_len=max_len if max_len is not None else trained_len or 50)
    except (FileNotFoundError, ValueError) as err:
        raise PipelineError(str(err)) from err
    emit({**metrics, "split": split, "users": data.n_users, "remove_history": remove_history,
          "prepared": str(prepared), "model": "popularity" if popularity else str(path)}, as_json,
         f"evaluate ({split})")


@app.command()
def recommend(
    data_dir: Path = DataDir,
    model_name: Optional[str] = ModelName,
    alias: str = typer.Option("champion", "--alias", help="Registry alias of the version to serve."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    out: Optional[Path] = typer.Option(None, "--out", help="Parquet file (default DATA_DIR/recommendations.parquet)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1..."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Users per chunk (capped so users x items stays bounded)."),
    exclude_history: bool = typer.Option(False, "--exclude-history", help="Never recommend an item the user already has."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (the model under autocast; scores ranked in float32)."),
    tracking_uri: Optional[str] = TrackingUri,
    as_json: bool = AsJson,
) -> None:
    """Write the top-K next items of every prepared user from a registered model version to Parquet."""
    from pipeline.recommend import recommend as run_recommend

    emit(run_recommend(data_dir, model_name=model_name, alias=alias, k=k, out=out, device=device,
                       batch_size=batch_size, exclude_history=exclude_history, precision=precision,
                       tracking_uri=tracking_uri),
         as_json, "recommend")


@app.command("run")
def run_all(
    data_dir: Path = DataDir,
    source: Optional[Path] = typer.Option(None, "--source", help="Raw log (default: generate the synthetic log)."),
    fmt: str = Format,
    user_col: Optional[str] = UserCol,
    item_col: Optional[str] = ItemCol,
    time_col: Optional[str] = TimeCol,
    rating_col: Optional[str] = RatingCol,
    behavior_col: Optional[str] = BehaviorCol,
    delimiter: Optional[str] = Delimiter,
    behaviors: Optional[str] = Behaviors,
    rating_min: Optional[float] = RatingMin,
    rating_max: Optional[float] = RatingMax,
    users: Optional[int] = typer.Option(None, "--users", min=1, help="Users in the synthetic log (without --source)."),
    events_per_user: Optional[int] = typer.Option(None, "--events-per-user", min=1, help="Mean events per synthetic user."),
    run_key: Optional[str] = typer.Option(None, "--run-key", help="Partition DATA_DIR/runs/KEY (default: today)."),
    model: str = typer.Option("recblr", "--model", help="Registry name: recblr, sasrec, gru4rec, lrurec, pop."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epoch cap (default 300 on a GPU, 4 on a CPU)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Most recent items a model reads."),
    set_: list[str] = typer.Option([], "--set", help="Model config override FIELD=VALUE, repeatable."),
    nproc_per_node: str = typer.Option("1", "--nproc-per-node", help="Training processes (DDP under torchrun), one per GPU; auto: every visible GPU."),
    time_budget_s: Optional[float] = typer.Option(None, "--time-budget-s", help="Training's time budget: no epoch starts that would end past it."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the training forward, as `recblr train --compile`."),
    recompute: bool = typer.Option(False, "--recompute/--no-recompute", help="Less GPU memory for some more time, as `recblr train --recompute`."),
    batch_by_length: bool = typer.Option(False, "--batch-by-length/--no-batch-by-length", help="Batches of similar-length windows, as `recblr train --batch-by-length`."),
    min_count: int = MinCount,
    max_quarantined: float = typer.Option(0.05, "--max-quarantined", min=0.0, max=1.0, help="Largest share of rejected rows."),
    tracking_uri: Optional[str] = TrackingUri,
    model_name: Optional[str] = ModelName,
    as_json: bool = AsJson,
) -> None:
    """The whole pipeline without Airflow: ingest, validate, prepare, train, evaluate, register and promote."""
    from pipeline.errors import PipelineError
    from pipeline.run import run_pipeline

    if source is not None and (users, events_per_user) != (None, None):
        raise PipelineError(f"--users and --events-per-user size the synthetic log, which --source {source} "
                            "replaces: drop them")
    train = {"epochs": epochs, "max_len": max_len, "time_budget_s": time_budget_s, "compile": compile,
             "recompute": recompute, "batch_by_length": batch_by_length}
    out = run_pipeline(data_dir, run_key=run_key, source=str(source) if source else None, fmt=fmt, model=model,
                       train=train, overrides=_parse_sets(set_), min_count=min_count,
                       max_quarantined=max_quarantined, tracking_uri=tracking_uri, model_name=model_name,
                       nproc_per_node=nproc_per_node,
                       format_options=format_options(user_col=user_col, item_col=item_col, time_col=time_col,
                                                     rating_col=rating_col, behavior_col=behavior_col,
                                                     delimiter=delimiter, behaviors=behaviors,
                                                     rating_min=rating_min, rating_max=rating_max),
                       synthetic={k: v for k, v in {"n_users": users, "mean_events": events_per_user}.items()
                                  if v is not None})
    gate = out["register"]
    emit({"run_key": out["run_key"], "tracking_uri": out["tracking_uri"], "rows_kept": out["ingest"]["rows_kept"],
          "users": out["prepare"]["users"], "items": out["prepare"]["items"], "run_id": out["train"]["run_id"],
          **{f"test_{k}": v for k, v in out["evaluate"]["test"].items()}, "version": gate["version"],
          "champion": gate["promoted"], "gate": gate["reason"]}, as_json, "run")


@app.command()
def ui(
    data_dir: Path = DataDir,
    tracking_uri: Optional[str] = TrackingUri,
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Artifact folder or URI (default beside SQLite)."),
    port: int = typer.Option(5000, "--port"),
    as_json: bool = typer.Option(False, "--json", help="Print {url, tracking_uri} as one JSON line before serving."),
) -> None:
    """Serve the MLflow UI (and REST API) of the tracking store on 127.0.0.1 until Ctrl-C."""
    import os
    import socket

    from pipeline.errors import PipelineError
    from pipeline.tracking import resolve_tracking_uri, server_command

    # mlflow only fails to bind after this process has printed the URL and exec'd it, and then it exits 0
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a TIME_WAIT port is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise PipelineError(f"port {port} on 127.0.0.1: {err.strerror}; pick another with --port") from err
    uri = resolve_tracking_uri(data_dir, tracking_uri)
    url = f"http://127.0.0.1:{port}"
    if as_json:  # the server never ends, so the line comes first, flushed before exec replaces this process
        print(json.dumps({"url": url, "tracking_uri": uri}), flush=True)
    else:
        console.print(f"MLflow UI on {url}")
    cmd = server_command(uri, "127.0.0.1", port, artifacts)
    os.execv(cmd[0], cmd)


def main() -> None:
    import logging

    from rich.markup import escape

    from pipeline.errors import PipelineError

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)  # the steps' warnings, labelled
    try:
        app()
    except PipelineError as err:
        # one line, however long: scripts grep it; escaped, as a message may quote a file's "[...]"
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        error, code = str(err), err.exit_code
    except SystemExit as done:
        # what the command line got wrong (a value typer checks, an unknown option) typer prints with the usage and
        # exits while handling, so the exit's context is the error: left as typer shows it, --json adds its line
        # (duck-typed: typer's exception classes moved between versions, and older ones are click's)
        if not hasattr(done.__context__, "format_message"):
            raise
        error, code = done.__context__.format_message(), done.code
    if "--json" in sys.argv[1:]:
        sys.stdout.write(json.dumps({"error": error}) + "\n")
    raise SystemExit(code)


if __name__ == "__main__":  # `python -m pipeline.cli`, which torchrun can launch
    main()
