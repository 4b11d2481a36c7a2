"""### recblr_training

Nightly RecBLR training: **ingest -> validate -> prepare -> train -> evaluate -> register** (and promote).

Each task is one call into `pipeline.run` (ingest first checks the training settings, so that a bad model or
override fails before any data is read); `recblr run` runs the same functions without Airflow. Outputs
live under `DATA_DIR/runs/<logical date>/`, swapped in atomically, so clearing or rerunning a date
replaces them. The prepared Parquet is published as the `recblr_prepared` asset. The train task goes to the
`gpu` queue (a Celery or Kubernetes worker with a GPU takes it; without a GPU it trains on the CPU) and
runs DDP on `nproc_per_node` processes, one per GPU of that worker (1: in the task's own process).
The registered model (`recblr-<data_dir's name>` unless `model_name` says otherwise) gets alias `challenger`,
and `champion` only if its test NDCG@10 beats the champion's on the same prepared data.

Trigger with conf to override the params, e.g. `{"epochs": 1, "overrides": {"d_model": 16}}`.
Environment: `RECBLR_DATA_DIR`, `RECBLR_SCHEDULE` (cron, default 03:00 daily; empty: manual only), `RECBLR_RETRIES`,
`RECBLR_RETRY_DELAY_S`, `MLFLOW_TRACKING_URI`.
"""
from __future__ import annotations

import functools
import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline import run
from pipeline.errors import PipelineError, ServiceUnavailable
from pipeline.prepare import MIN_EVENTS_PER_USER

DATA_DIR = Path(os.environ.get("RECBLR_DATA_DIR", Path(__file__).resolve().parent.parent / "data" / "default"))
# one asset for every run's prepared/; each event's extra names the partition and the data digest
PREPARED = Asset(name="recblr_prepared", uri=f"file://{DATA_DIR.resolve()}/runs")
# every task but validate, whose verdict a retry cannot change: files, the GPU worker and the tracking server
# can fail for a while
RETRIES = {"retries": int(os.environ.get("RECBLR_RETRIES", "2")),
            "retry_delay": timedelta(seconds=int(os.environ.get("RECBLR_RETRY_DELAY_S", "300")))}
# the params that are TrainConfig fields, handed to training as they are: a new knob is a Param and its name here
TRAIN_PARAMS = ("epochs", "max_len", "time_budget_s", "compile", "recompute", "batch_by_length")


def _fail_fast(step):
    """A PipelineError is bad input, which a retry cannot fix: fail the task at once with its message. A tracking
    server that does not answer may be back by the next try, so that error takes the task's retries."""
    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except ServiceUnavailable:
            raise
        except PipelineError as err:
            raise AirflowFailException(str(err)) from err
    return wrapper


def _run():
    """(data dir, run key, params) of the current DAG run."""
    ctx = get_current_context()
    params = ctx["params"]
    return Path(params["data_dir"]), run.run_key_for(ctx.get("logical_date"), ctx["run_id"]), params


def _training(params) -> dict:
    """train_step's settings from the params: what the first task checks is what the train task gets."""
    return {"model": params["model"], "train": {k: params[k] for k in TRAIN_PARAMS}, "overrides": params["overrides"],
            "nproc_per_node": params["nproc_per_node"]}


def _tracking_uri(data_dir: Path, params) -> str:
    """The run's tracking store, checked: only the tasks that log to it need it up."""
    from pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(data_dir, params["tracking_uri"])


@dag(
    dag_id="recblr_training",
    schedule=os.environ.get("RECBLR_SCHEDULE", "0 3 * * *") or None,  # empty: manual triggers only
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["recblr"],
    params={
        "data_dir": Param(str(DATA_DIR), type="string", description="Dataset folder (DATA_DIR)."),
        "source": Param(None, type=["null", "string"], description="Raw file; null = the synthetic log."),
        "format": Param("csv", type="string", description="Source format, as `recblr ingest --format`."),
        "format_options": Param({}, type="object", description="Extra ingest options for the format."),
        "synthetic": Param({}, type="object",
                           description="Size of the generated log when source is null, e.g. {\"n_users\": 300}."),
        "min_count": Param(5, type="integer", minimum=MIN_EVENTS_PER_USER, description="k of the k-core filter."),
        "max_quarantined": Param(0.05, type="number", minimum=0, maximum=1,
                                 description="Largest share of rejected rows that still lets the run go on."),
        "model": Param("recblr", type="string", description="Model name in recblr.models.MODELS."),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="null = TrainConfig default."),
        "max_len": Param(None, type=["null", "integer"], minimum=2, description="null = TrainConfig default."),
        "overrides": Param({}, type="object", description="Model config fields, e.g. {\"d_model\": 16}."),
        # minimum binds integers and pattern strings: a count from 1, or "auto"
        "nproc_per_node": Param(1, type=["integer", "string"], minimum=1, pattern="^auto$",
                                description="Training processes (DDP), one per GPU of the gpu worker; "
                                            "\"auto\" = all of its GPUs."),
        "time_budget_s": Param(None, type=["null", "number"], exclusiveMinimum=0,
                               description="Training seconds; after the first epoch none starts that would end "
                                           "past it, and the best epoch so far is kept. null = no budget."),
        "compile": Param(False, type="boolean",
                         description="torch.compile the training forward: about 40 s of compilation for 1.15x "
                                     "faster epochs on long windows; slower than the CUDA graph it turns off "
                                     "where that applies (benchmarks/RESULTS.md); for long runs on long windows."),
        "recompute": Param(False, type="boolean",
                           description="Re-run each block (RecBLR, LRURec: spans of 128 positions, longer in "
                                       "eager steps) in the backward instead of keeping its activations: RecBLR "
                                       "peaks at 0.19x the GPU memory for 1.8x the time at length 1000 on an H100."),
        "batch_by_length": Param(False, type="boolean",
                                 description="Batch windows of similar length together: less padding, so 1.4x "
                                             "faster epochs at length 1000 on an H100; for long, uneven histories."),
        "tracking_uri": Param(None, type=["null", "string"],
                              description="null = $MLFLOW_TRACKING_URI, else SQLite under the data root."),
        "model_name": Param(None, type=["null", "string"],
                            description="Registered model name; null = recblr-<data_dir's name>, one per dataset."),
    },
)
def recblr_training():
    @task(**RETRIES)
    @_fail_fast
    def ingest() -> dict:
        data_dir, key, p = _run()
        run.check_settings(**_training(p))  # a bad model or override fails here, not after ingest and prepare
        return run.ingest_step(data_dir, key, p["source"], p["format"], p["synthetic"], **p["format_options"])

    @task
    @_fail_fast
    def validate(ingested: dict) -> dict:
        data_dir, key, p = _run()
        return run.validate_step(data_dir, key, p["max_quarantined"])

    @task(outlets=[PREPARED], **RETRIES)
    @_fail_fast
    def prepare(validated: dict) -> dict:
        data_dir, key, p = _run()
        summary = run.prepare_step(data_dir, key, p["min_count"])
        get_current_context()["outlet_events"][PREPARED].extra = {"path": summary["output"], "run_key": key,
                                                                   "digest": summary["digest"]}
        return summary

    @task(queue="gpu", **RETRIES)
    @_fail_fast
    def train(prepared: dict) -> dict:
        data_dir, key, p = _run()
        uri = _tracking_uri(data_dir, p)
        return run.train_step(data_dir, key, uri, **_training(p))

    @task(**RETRIES)
    @_fail_fast
    def evaluate(trained: dict) -> dict:
        data_dir, key, p = _run()
        uri = _tracking_uri(data_dir, p)
        return run.evaluate_step(data_dir, key, uri, trained["run_id"], trained["model_path"])

    @task(**RETRIES)
    @_fail_fast
    def register(trained: dict, evaluated: dict) -> dict:
        data_dir, key, p = _run()
        uri = _tracking_uri(data_dir, p)
        return run.register_step(data_dir, key, uri, trained["run_id"], trained["model_path"], p["model_name"])

    trained = train(prepare(validate(ingest())))
    register(trained, evaluate(trained))


recblr_training()
