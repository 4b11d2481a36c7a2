"""The pipeline's steps, as plain functions: the Airflow DAG runs one per task, `recblr run` runs them all.

Every step writes under a run partition `DATA_DIR/runs/<run key>/` (the run key is the logical date). Each
output is written beside its place and renamed into it (ingest and prepare do this themselves, the model
folder is swapped in here), so rerunning a date replaces its outputs, a failed step leaves the previous ones
intact (but for an ingest that quarantines every row: it writes both files, so that the quarantine shows why) and
its errors name the partition's own paths. Steps take and return plain JSON types (Airflow XComs).

    ingest -> validate -> prepare -> train -> evaluate -> register (and promote)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from datetime import date
from pathlib import Path

from pipeline.errors import PipelineError


RUN_KEY_CHARS = "A-Za-z0-9_.-"  # a run key is one folder name under DATA_DIR/runs, never a path
# each data step's summary in the partition: what made the data, which train logs with the model (tracking.log_data)
RECORDS = {"ingest": "ingest.json", "validate": "validate.json", "prepare": "prepared/summary.json"}


def run_key_for(logical_date, run_id: str | None = None) -> str:
    """`2026-11-23` for a dated run; a manual trigger without a logical date uses its (sanitised) run id."""
    if logical_date is not None:
        return logical_date.strftime("%Y-%m-%d")
    if not run_id:
        raise PipelineError("a run needs a logical date or a run id to name its partition")
    return re.sub(f"[^{RUN_KEY_CHARS}]+", "_", run_id)


def check_run_key(run_key: str) -> str:
    """run_key if it names one folder: '../x' or '/x' would put a run's files outside DATA_DIR/runs."""
    if not re.fullmatch(f"[{RUN_KEY_CHARS}]+", run_key) or run_key in (".", ".."):
        raise PipelineError(f"run key {run_key!r}: use letters, digits, '_', '.' and '-' only (not '.' or '..')")
    return run_key


def partition(data_dir: Path, run_key: str) -> Path:
    path = Path(data_dir).resolve() / "runs" / check_run_key(run_key)
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_prepared(data_dir: Path) -> Path:
    """DATA_DIR/prepared (`recblr prepare`), else the newest DATA_DIR/runs/<key>/prepared (`recblr run`)."""
    data_dir = Path(data_dir)
    if (data_dir / "prepared" / "sequences.parquet").is_file():
        return data_dir / "prepared"
    runs = [path.parent for path in (data_dir / "runs").glob("*/prepared/sequences.parquet")]
    if not runs:
        raise PipelineError(f"{data_dir}: no prepared/ and no runs/<key>/prepared/; run `recblr prepare` "
                            f"or `recblr run` first")
    return max(runs, key=lambda path: (path / "sequences.parquet").stat().st_mtime)


def _publish(tmp: Path, target: Path) -> Path:
    """Swap a finished folder into place: readers see the old or the new one, never a half-written one."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_record(path: Path, record: dict) -> None:
    """A step's summary as JSON, renamed into place like the step's other outputs."""
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(staged, path)


def ingest_step(data_dir: Path, run_key: str, source: str | None = None, fmt: str = "csv",
                synthetic: dict | None = None, **options) -> dict:
    """Parse and validate the raw source into the run's events; ingest.json records the summary with the
    format_options (and synthetic settings) it read the source with.

    source None: generate the synthetic log first (`synthetic` = write_synthetic_log's n_users, n_items,
    seed, mean_events) into the run's raw/ and read it as csv.
    """
    from pipeline.ingest import ingest
    from pipeline.synthetic import check_synthetic, write_synthetic_log

    settings = check_synthetic(synthetic)  # a misnamed size fails here, not as a TypeError Airflow would retry
    part = partition(data_dir, run_key)
    generated = {}
    if source is None:
        if fmt != "csv":
            raise PipelineError(f"without a source the pipeline generates the synthetic csv log; got format {fmt}")
        source = part / "raw" / "synthetic.csv"
        staged = write_synthetic_log(source.with_name(".synthetic.csv.tmp"), **settings)
        os.replace(staged, source)
        options.setdefault("rating_col", "rating")
        generated = {"synthetic": settings}
    summary = ingest(Path(source), fmt, part, **options)
    _write_record(part / RECORDS["ingest"], {**summary, "format_options": options, **generated})
    return summary


def validate_step(data_dir: Path, run_key: str, max_quarantined: float = 0.05) -> dict:
    """The gate after ingest: stop the run when too large a share of the source was rejected.

    Row-level rules already ran inside ingest (rejected rows are in quarantine.parquet); this step judges
    the batch as a whole, so a broken export fails here instead of training on what little survived. A batch that
    passes leaves the verdict in validate.json.
    """
    import pyarrow.parquet as pq

    part = partition(data_dir, run_key)
    kept = pq.ParquetFile(part / "events.parquet").metadata.num_rows
    quarantine = pq.read_table(part / "quarantine.parquet", columns=["rule"]).column("rule").to_pylist()
    total = kept + len(quarantine)
    share = len(quarantine) / total if total else 1.0
    reasons = {rule: quarantine.count(rule) for rule in sorted(set(quarantine))}
    if kept == 0 or share > max_quarantined:
        raise PipelineError(f"{part / 'quarantine.parquet'}: {len(quarantine)} of {total} rows rejected "
                            f"({share:.1%} > max_quarantined {max_quarantined:.1%}); reasons {reasons}")
    verdict = {"max_quarantined": max_quarantined, "rows_kept": kept, "rows_quarantined": len(quarantine),
               "quarantined_share": share, "reasons": reasons}
    _write_record(part / RECORDS["validate"], verdict)
    return verdict


def prepare_step(data_dir: Path, run_key: str, min_count: int = 5) -> dict:
    """5-core filter and leave-one-out split into the run's prepared/.

    A partition is laid out like a DATA_DIR, so `recblr train --data-dir DATA_DIR/runs/<key>` reads it too.
    """
    from pipeline.prepare import prepare
    from pipeline.tracking import dataset_digest

    summary = prepare(partition(data_dir, run_key), min_count=min_count)
    return {**summary, "digest": dataset_digest(Path(summary["output"]))}


def train_config(train: dict | None):
    """recblr.train.TrainConfig from TrainConfig field names to values (a None value: TrainConfig's default);
    an unknown field or a bad value raises PipelineError."""
    import dataclasses

    from recblr.train import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(train or {}) - set(fields))
    if unknown:  # checked before the None values are dropped, so a misspelt knob fails even when unset
        raise PipelineError(f"TrainConfig has no field {', '.join(map(repr, unknown))}; its fields: "
                            f"{', '.join(fields)}")
    try:
        return TrainConfig(**{k: v for k, v in (train or {}).items() if v is not None})
    except ValueError as err:
        raise PipelineError(str(err)) from err


def check_model(model: str, overrides: dict | None, what: str) -> None:
    """Build `model` over one item with `overrides`, so an unknown model, config field, type or range fails before
    any data is read; the error starts with `what`."""
    from recblr.models import build

    try:
        build(model, 1, **(overrides or {}))
    except ValueError as err:
        raise PipelineError(f"{what}: {err}") from err


def check_settings(model: str = "recblr", train: dict | None = None, overrides: dict | None = None,
                   nproc_per_node: int | str = 1) -> None:
    """What train_step would refuse only after ingest and prepare, refused now, before any data is read: an unknown
    model, config field or TrainConfig field, a value out of range, a bad process count. Its arguments are
    train_step's; `recblr run` and the DAG's first task call it."""
    from pipeline.launch import resolve_nproc

    resolve_nproc(nproc_per_node)
    train_config(train)
    check_model(model, overrides, f"train {model}")


def train_step(data_dir: Path, run_key: str, tracking_uri: str, model: str = "recblr", train: dict | None = None,
               overrides: dict | None = None, nproc_per_node: int | str = 1) -> dict:
    """Train on the run's prepared data, logging to a fresh MLflow run, with what made the data (the partition's
    RECORDS); the weights land in <partition>/model.

    train: TrainConfig fields by name, None for its default (see recblr.train.TrainConfig for what each
    means). The pipeline's callers pass epochs, max_len, time_budget_s, compile, recompute and batch_by_length:
    the DAG's TRAIN_PARAMS and `recblr run`'s options of the same names.
    overrides: model config fields by name.
    nproc_per_node: DDP ranks, one per GPU ("auto": every visible GPU); 1 trains in this process.
    """
    import mlflow

    from pipeline import tracking
    from pipeline.launch import fit_on_processes, resolve_nproc
    from recblr.train import OutOfGPUMemory, TrainingDiverged

    part = partition(data_dir, run_key)
    nproc = resolve_nproc(nproc_per_node)
    config = train_config(train)
    work = part / ".model.tmp"
    shutil.rmtree(work, ignore_errors=True)  # a worker killed outright leaves its folder to the next attempt
    run_id = tracking.start_training_run(tracking_uri, tracking.dataset_name(data_dir), run_key, part / "prepared")
    try:
        tracking.log_data({step: part / name for step, name in RECORDS.items()}, run_key, nproc)
        result = fit_on_processes(nproc, part, work, model, overrides=overrides or None, train=config,
                                  on_epoch=tracking.log_epoch)
        tracking.log_training(result, part / "prepared")
    except BaseException as err:
        mlflow.end_run("FAILED")
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, (ValueError, FileNotFoundError, OutOfGPUMemory, TrainingDiverged)):  # setting, data, NaN
            raise PipelineError(f"train {model} on {part / 'prepared'}: {err}") from err
        raise
    mlflow.end_run()
    target = _publish(work, part / "model")
    model_path = target / Path(result["model_path"]).relative_to(work)
    return {"run_id": run_id, "model_path": str(model_path), "best_epoch": result["best_epoch"],
            "valid": result["valid"], "seconds": result["seconds"]}


def evaluate_step(data_dir: Path, run_key: str, tracking_uri: str, run_id: str, model_path: str) -> dict:
    """Score the saved weights on the validation and test splits (full ranking) and log them to the run."""
    import mlflow

    from pipeline import tracking
    from recblr.data import load_prepared
    from recblr.evaluate import evaluate
    from recblr.models import load, trained_max_len

    model, data = load(Path(model_path)), load_prepared(partition(data_dir, run_key) / "prepared")
    max_len = trained_max_len(Path(model_path))  # train_step's model always comes from fit
    test, valid = (evaluate(model, data, split, max_len=max_len) for split in ("test", "valid"))
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        tracking.log_evaluation(test, valid)
    return {"test": test, "valid": valid}


def register_step(data_dir: Path, run_key: str, tracking_uri: str, run_id: str, model_path: str,
                  model_name: str | None = None) -> dict:
    """Register the run's model as a new version of `model_name` (default `tracking.registered_model_name`: one
    per dataset) with alias challenger, let the gate pick the champion, and only then replace the run key's earlier
    runs: the end of the pipeline, so a rerun that fails anywhere leaves the earlier run and its version. A retry
    reuses the version its earlier try registered."""
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        prepared = partition(data_dir, run_key) / "prepared"
        name = tracking.registered_model_name(data_dir, model_name)
        decision = tracking.promote(name, tracking.register(Path(model_path), prepared, name), prepared)
        tracking.replace_earlier_runs(run_id)
    return decision


def run_pipeline(data_dir: Path, *, run_key: str | None = None, source: str | None = None, fmt: str = "csv",
                 model: str = "recblr", train: dict | None = None, overrides: dict | None = None,
                 min_count: int = 5, max_quarantined: float = 0.05, tracking_uri: str | None = None,
                 model_name: str | None = None, synthetic: dict | None = None, format_options: dict | None = None,
                 nproc_per_node: int | str = 1) -> dict:
    """All steps in order, training on nproc_per_node DDP ranks: what the DAG does, without Airflow.

    train: TrainConfig fields by name, as for train_step (`recblr run` passes epochs, max_len, time_budget_s,
    compile, recompute and batch_by_length; recblr.train.TrainConfig says what they mean).
    """
    from pipeline.tracking import resolve_tracking_uri

    # bad values fail now, not after ingest and prepare
    run_key = check_run_key(run_key or date.today().isoformat())
    check_settings(model, train, overrides, nproc_per_node)
    tracking_uri = resolve_tracking_uri(data_dir, tracking_uri)
    out = {"run_key": run_key, "tracking_uri": tracking_uri}
    out["ingest"] = ingest_step(data_dir, run_key, source, fmt, synthetic, **(format_options or {}))
    out["validate"] = validate_step(data_dir, run_key, max_quarantined)
    out["prepare"] = prepare_step(data_dir, run_key, min_count)
    out["train"] = trained = train_step(data_dir, run_key, tracking_uri, model, train, overrides, nproc_per_node)
    out["evaluate"] = evaluate_step(data_dir, run_key, tracking_uri, trained["run_id"], trained["model_path"])
    out["register"] = register_step(data_dir, run_key, tracking_uri, trained["run_id"], trained["model_path"],
                                    model_name)
    return out
