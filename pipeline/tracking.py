"""MLflow tracking and registry: where runs go, what a training run logs, and the champion gate.

One experiment per dataset (`recblr-<dataset>`). The default store is embedded: a SQLite database and an
artifact folder under the data root (`<data root>/mlflow/`), so a fresh machine needs no server; any
other tracking URI (an `http://` server) works the same. Each pipeline run is tagged with its run key
(the logical date), and a rerun of the same key, once registered and gated, replaces the earlier MLflow run
instead of adding one.
The store is opened through `resolve_tracking_uri` or `use_experiment`, which both run `check_store`: a server
that is down or a mistyped SQLite path is one error within seconds, not minutes of MLflow's silent retries or a
new empty store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from pipeline.errors import PipelineError, ServiceUnavailable

log = logging.getLogger(__name__)

GATE_METRIC = "test_ndcg_at_10"
RUN_KEY_TAG = "recblr.run_key"
DIGEST_TAG = "recblr.dataset_digest"
PYFUNC_FILE = Path(__file__).with_name("recblr_pyfunc.py")
PROBE_TIMEOUT_S = 5.0
SIGNATURE = mlflow.models.ModelSignature(
    # Any, not string: integer ids are common in logs, and a string array refuses them; the pyfunc checks them
    inputs=Schema([ColSpec(Array(mlflow.types.schema.AnyType()), "history")]),
    outputs=Schema([ColSpec(Array(DataType.string), "item_ids"), ColSpec(Array(DataType.double), "scores"),
                    ColSpec(DataType.boolean, "fallback")]),
    params=ParamSchema([ParamSpec("k", DataType.long, 10)]),
)


def default_tracking_uri(data_dir: Path, create: bool = True) -> str:
    """SQLite store beside the dataset folders: data/<dataset> -> data/mlflow/mlflow.db (its folder made if create)."""
    root = Path(data_dir).resolve().parent / "mlflow"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def dataset_name(data_dir: Path) -> str:
    """data/<name> -> name: it names the dataset's experiment (recblr-<name>) and, by default, its registered model."""
    return Path(data_dir).resolve().name


def registered_model_name(data_dir: Path, name: str | None = None) -> str:
    """`name`, else recblr-<dataset>: a registered model per dataset, so datasets sharing a store never compete for
    one champion, nor does `recommend` serve one dataset another's model."""
    return name or f"recblr-{dataset_name(data_dir)}"


def resolve_tracking_uri(data_dir: Path, tracking_uri: str | None = None, *, must_exist: bool = False) -> str:
    """The URI given, else $MLFLOW_TRACKING_URI, else the embedded SQLite store of `data_dir`; checked by
    `check_store` (must_exist for commands that only read the store)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(data_dir, create=not must_exist)
    return check_store(uri, must_exist=must_exist, data_dir=data_dir)


def check_store(uri: str, *, must_exist: bool = False, data_dir: Path | None = None,
                timeout: float = PROBE_TIMEOUT_S) -> str:
    """Return `uri` if MLflow can use it, else raise a PipelineError naming it and what is wrong.

    http(s): one GET /health, no retries, `timeout` seconds (MLflow's own client retries with backoff for
    minutes, silently). sqlite: with must_exist the file must be there, since MLflow would create an empty store
    on a mistyped path and a reader would then report a missing model; otherwise MLflow must be able to make
    its folder.
    Other stores (postgresql://, ...) are left to MLflow. data_dir only words the hint of a missing store.
    """
    if uri.startswith(("http://", "https://")):
        _probe_server(uri, timeout)
    elif uri.startswith("sqlite:"):
        _check_sqlite(uri, must_exist, data_dir)
    return uri


def _probe_server(uri: str, timeout: float) -> None:
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    url = uri.rstrip("/") + "/health"
    fix = "start it (`recblr ui` serves one) or check --tracking-uri / $MLFLOW_TRACKING_URI"
    creds = get_default_host_creds(uri)  # the TLS settings ($MLFLOW_TRACKING_INSECURE_TLS, ...) MLflow will use
    try:
        answer = requests.get(url, timeout=timeout, verify=creds.verify, cert=creds.client_cert_path)
    except requests.Timeout as err:
        raise ServiceUnavailable(f"tracking server {uri} did not answer GET {url} within {timeout:g} s; {fix}") \
            from err
    except requests.RequestException as err:
        raise ServiceUnavailable(f"cannot reach tracking server {uri}: {_os_reason(err)}; {fix}") from err
    if answer.status_code in (401, 403):  # up, behind an authenticating proxy; MLflow sends the credentials
        return
    if answer.status_code != 200 or answer.text.strip() != "OK":
        raise PipelineError(f"{uri} is not an MLflow tracking server (or not a healthy one): GET {url} answered "
                            f"HTTP {answer.status_code} {answer.text.strip()[:60]!r} instead of MLflow's 200 'OK'; "
                            f"check --tracking-uri / $MLFLOW_TRACKING_URI")


def _os_reason(err: BaseException) -> str:
    """The operating system's words under a requests error ("Connection refused"), else the error's text."""
    pending, seen = [err], set()
    while pending:
        cause = pending.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        # urllib3 keeps the socket error as a MaxRetryError's reason, the NewConnectionError's context
        pending += [c for c in (cause.__cause__, cause.__context__, getattr(cause, "reason", None), *cause.args)
                    if isinstance(c, BaseException)]
    return str(err)


def _check_sqlite(uri: str, must_exist: bool, data_dir: Path | None) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError as err:
        raise PipelineError(f"{uri}: not a SQLite URL ({err}); the form is sqlite:////absolute/path/mlflow.db") from err
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).resolve()
    if must_exist and not path.exists():
        hint = ""
        if data_dir is not None:
            default = Path(default_tracking_uri(data_dir, create=False).removeprefix("sqlite:///"))
            first_run = f"`recblr run --data-dir {data_dir}` trains and registers a model there"
            hint = (f"; {first_run}" if path == default
                    else f"; check --tracking-uri / $MLFLOW_TRACKING_URI (the default store of {data_dir} is "
                         f"{default}{'' if default.is_file() else '; ' + first_run})")
        raise PipelineError(f"no tracking store at {path}: no such file{hint}")
    if not path.parent.is_dir():  # MLflow makes the missing folders, with a traceback when it cannot
        ancestor = next(folder for folder in path.parents if folder.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            why = "a file, not a folder" if not ancestor.is_dir() else "a folder this user cannot write to"
            raise PipelineError(f"{uri}: cannot create the store's folder {path.parent}: {ancestor} is {why}; "
                                f"check --tracking-uri / $MLFLOW_TRACKING_URI")
    if path.is_dir():
        raise PipelineError(f"{uri}: {path} is a folder; name the SQLite file (e.g. {path / 'mlflow.db'})")
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise PipelineError(f"{uri}: {path} is not a SQLite database; check --tracking-uri / "
                                    f"$MLFLOW_TRACKING_URI")


def server_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000,
                   artifacts: str | None = None) -> list[str]:
    """`mlflow server` over a store: the UI, and the REST API the pipeline can log to instead of the file.

    Artifacts are proxied (`--artifacts-destination`), so clients of the server need no access to its disk.
    """
    import sys

    if tracking_uri.startswith(("http://", "https://")):
        raise PipelineError(f"{tracking_uri} is already a server: open it in a browser")
    if artifacts is None and tracking_uri.startswith("sqlite:///"):
        artifacts = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    if artifacts is None:
        raise PipelineError(f"{tracking_uri}: say where the server keeps artifacts (--artifacts DIR_OR_URI)")
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def use_experiment(tracking_uri: str, dataset: str) -> str:
    """Point MLflow at the store and return the dataset's experiment id, creating it on first use."""
    mlflow.set_tracking_uri(check_store(tracking_uri))
    name = f"recblr-{dataset}"
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Without this, a SQLite store puts artifacts in ./mlruns of whatever folder the process runs in.
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def dataset_digest(prepared_dir: Path) -> str:
    """Digest of the prepared tables' contents (not the file bytes, which vary with the Parquet writer):
    equal digests mean the same items and the same train/valid/test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for name in ("sequences.parquet", "items.parquet"):
        table = pq.read_table(Path(prepared_dir) / name).replace_schema_metadata(None).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue())
    return h.hexdigest()[:16]


def flatten(prefix: str, value) -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 0.001}: MLflow params are one flat namespace."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else key, sub).items()}
    return {prefix: value}


def start_training_run(tracking_uri: str, dataset: str, run_key: str, prepared_dir: Path) -> str:
    """Open the run for one pipeline run key and return its id; earlier runs of the key stay until
    `replace_earlier_runs`."""
    experiment_id = use_experiment(tracking_uri, dataset)
    mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    digest = dataset_digest(prepared_dir)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{dataset}-{run_key}", log_system_metrics=True,
                           tags={RUN_KEY_TAG: run_key, DIGEST_TAG: digest, "recblr.dataset": dataset})
    import pandas as pd

    sequences = pd.read_parquet(Path(prepared_dir) / "sequences.parquet")
    mlflow.log_input(mlflow.data.from_pandas(sequences, source=str(Path(prepared_dir).resolve()), name=dataset,
                                             digest=digest), context="training")
    return run.info.run_id


def replace_earlier_runs(run_id: str) -> None:
    """Delete the earlier runs of `run_id`'s run key and their model versions, once `run_id` is registered and gated:
    a rerun that fails anywhere before leaves the key's earlier run as it was. A run whose version holds @champion
    stays, re-tagged "<key> (replaced)", and so does that version."""
    client = MlflowClient()
    run = client.get_run(run_id)
    run_key = run.data.tags[RUN_KEY_TAG]
    for old in client.search_runs([run.info.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'"):
        if old.info.run_id == run_id:
            continue
        serving = False
        for found in client.search_model_versions(f"run_id = '{old.info.run_id}'"):
            # search results carry no aliases: fetch each version, the serving model must never be deleted
            version = client.get_model_version(found.name, found.version)
            if "champion" in version.aliases:
                serving = True
            else:
                client.delete_model_version(version.name, version.version)
        if serving:  # its metrics, gate decision and curves are the record of the model in service
            log.info("keeping MLflow run %s of run key %s: it holds the champion", old.info.run_id, run_key)
            client.set_tag(old.info.run_id, RUN_KEY_TAG, f"{run_key} (replaced)")
        else:
            log.info("replacing MLflow run %s of run key %s", old.info.run_id, run_key)
            client.delete_run(old.info.run_id)


# per step, what log_data takes from its record as params: the settings to make the data again and the counts it saw
DATA_PARAMS = {"ingest": ("source", "format", "format_options", "synthetic", "rows_in", "rows_kept", "rows_quarantined",
                          "rows_filtered"),
               "validate": ("max_quarantined",),
               "prepare": ("min_count", "users", "items", "interactions")}


def log_data(records: dict[str, Path], run_key: str, nproc_per_node: int) -> None:
    """What made the run's data, so that a version can be made again from MLflow alone: from each step's record (a
    step name of DATA_PARAMS: its JSON summary) the params `<step>.<key>`, and the whole record under artifacts data/;
    with them the run key and the training processes. A record the partition lacks (one made by hand or by `recblr
    ingest`, not the pipeline) is left out."""
    params = {"run_key": run_key, "nproc_per_node": nproc_per_node}
    for step, path in records.items():
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        params.update(flatten(step, {key: record[key] for key in DATA_PARAMS[step] if key in record}))
        mlflow.log_artifact(str(path), "data")
    mlflow.log_params(params)


def log_epoch(epoch: int, metrics: dict) -> None:
    """fit's on_epoch hook: loss and validation metrics of one epoch, keyed by epoch."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))},
                       step=int(epoch))


def log_training(result: dict, prepared_dir: Path) -> None:
    """After fit: the flat config, the training curve, the per-epoch table and the item id map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    mlflow.log_params(flatten("", {"model": result["model"], "config": result["config"], "train": result["train"]}))
    # not train_seconds, the epoch's key: the whole fit, its validation and final evaluation included
    mlflow.log_metrics({"best_epoch": result["best_epoch"], "fit_seconds": result["seconds"]})
    mlflow.set_tag("recblr.stopped", result["stopped"])  # early stopping, epoch cap, time budget or diverged
    history = pd.DataFrame(result["history"])
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "history.csv"
        history.to_csv(table, index=False)
        mlflow.log_artifact(str(table), "metrics")
        fig, loss_ax = plt.subplots(figsize=(7, 4))
        loss_ax.plot(history["epoch"], history["loss"], "o-", color="tab:blue", label="train loss")
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("train loss")
        val_ax = loss_ax.twinx()
        for name in [c for c in history.columns if c.startswith("val_ndcg") or c.startswith("val_hr")]:
            val_ax.plot(history["epoch"], history[name], "s--", label=name)
        val_ax.set_ylabel("validation metric")
        fig.legend(loc="upper right")
        fig.tight_layout()
        curve = Path(tmp) / "training_curve.png"
        fig.savefig(curve, dpi=100)
        plt.close(fig)
        mlflow.log_artifact(str(curve), "plots")
    mlflow.log_artifact(str(Path(prepared_dir) / "items.parquet"), "item_map")


def log_evaluation(test: dict, valid: dict) -> None:
    """Final metrics of the saved model: test_* (the gate's numbers) and valid_*, plus a JSON table."""
    mlflow.log_metrics({f"test_{k}": float(v) for k, v in test.items()})
    mlflow.log_metrics({f"valid_{k}": float(v) for k, v in valid.items()})
    mlflow.log_dict({"test": test, "valid": valid}, "metrics/final.json")


def register(model_path: Path, prepared_dir: Path, name: str) -> str:
    """Log the pyfunc in the active run, register it under `name` and tag the version; return the version.

    The version a previous try registered from this run is reused: a retried register step adds none."""
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    earlier = [found.version for found in client.search_model_versions(f"run_id = '{run_id}'") if found.name == name]
    version = str(max(map(int, earlier))) if earlier else _log_pyfunc(model_path, prepared_dir, name)
    tags = client.get_run(run_id).data.tags
    for key in (RUN_KEY_TAG, DIGEST_TAG):
        client.set_model_version_tag(name, version, key, tags[key])
    return version


def _log_pyfunc(model_path: Path, prepared_dir: Path, name: str) -> str:
    """Log the pyfunc in the active run and register it as a new version of `name`; return the version."""
    import pandas as pd

    items = pd.read_parquet(Path(prepared_dir) / "items.parquet", columns=["item_id"])["item_id"].astype(str)
    example = pd.DataFrame({"history": [list(items[:3]), list(items[3:4])]})  # two lengths: nothing is frozen
    repo = Path(__file__).resolve().parent.parent
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_FILE),
        artifacts={"weights": str(model_path), "items": str(Path(prepared_dir) / "items.parquet")},
        code_paths=[str(repo / "recblr"), str(repo / "kernels")],
        model_config={"k": 10},
        signature=SIGNATURE,
        input_example=example,
        # Inferring requirements costs ~15 s and would pin whatever this machine happens to have.
        pip_requirements=["torch", "numpy", "pandas", "pyarrow", "mlflow"],
        registered_model_name=name,
    )
    return str(info.registered_model_version)


def _champion_score(client: MlflowClient, champion, cand_run, prepared_dir: Path | None) -> tuple[float | None, str]:
    """The champion's test NDCG@10 on the candidate's prepared data, and how it was obtained."""
    champ_run = client.get_run(champion.run_id)
    if champ_run.data.tags.get(DIGEST_TAG) != cand_run.data.tags.get(DIGEST_TAG):
        unknown = "champion was evaluated on another prepared dataset"
    elif (logged := champ_run.data.metrics.get(GATE_METRIC)) is not None:
        return logged, "logged on the same prepared data"
    else:  # e.g. a version made champion by hand
        unknown = f"champion's run logged no {GATE_METRIC}"
    if prepared_dir is None:
        return None, unknown
    from recblr.data import ids_by_index, load_prepared, vocabulary_lut
    from recblr.evaluate import rank_metrics
    from recblr.models import load, trained_max_len

    data = load_prepared(prepared_dir)
    inputs, targets = data.split("test")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{champion.name}/{champion.version}", dst_path=tmp))
        theirs = ids_by_index(model_dir / "artifacts" / "items.parquet")
        weights = model_dir / "artifacts" / "model.pt"
        model, max_len = load(weights), trained_max_len(weights) or 50
    # New data renumbers items (ids follow counts), so the champion reads and ranks through its own ids: a
    # target it never saw is a miss, and its items missing from today's catalogue are not ranked.
    lut = vocabulary_lut(ids_by_index(Path(prepared_dir) / "items.parquet"), theirs)
    if not lut.any():
        return None, "champion knows none of this data's items (another dataset?); promote by hand if intended"
    unranked = np.ones(len(theirs), dtype=bool)  # index 0, padding, is never ranked either way
    unranked[lut] = False
    test = rank_metrics(model, inputs.remap(lut), lut[targets], len(theirs), max_len=max_len, unranked=unranked,
                        desc="re-score champion", progress=False)
    how = "champion re-scored on this run's prepared data"
    if not np.array_equal(lut, np.arange(len(theirs))):
        new_items = int((lut[1:] == 0).sum())
        how += " through its own item ids" + (f", {new_items} of this data's items new to it" if new_items else "")
    return test["ndcg_at_10"], how


def promote(name: str, version: str, prepared_dir: Path | None = None) -> dict:
    """Give `version` the alias challenger, and champion only if its test NDCG@10 beats the champion's.

    Both numbers come from the same prepared data: the champion's logged number when its run used the
    same data (equal digests) and logged it, else the champion re-scored on `prepared_dir` (matching items by raw
    id, as yesterday's champion scores today's data); when neither is possible the champion stays. A version that
    already is champion (a retried step) stays champion. The decision and both numbers go to the active run.
    """
    client = MlflowClient()
    client.set_registered_model_alias(name, "challenger", version)
    candidate = client.get_model_version(name, version)
    cand_run = client.get_run(candidate.run_id)
    cand_score = cand_run.data.metrics.get(GATE_METRIC)
    if cand_score is None:
        raise PipelineError(f"run {candidate.run_id} has no {GATE_METRIC} metric: run the evaluate step first")
    decision = {"model": name, "version": version, "candidate_" + GATE_METRIC: cand_score}
    # asked of the model's aliases, not by catching the lookup's error: a store that fails to answer must not crown
    # the candidate
    champion_version = client.get_registered_model(name).aliases.get("champion")
    champion = None if champion_version is None else client.get_model_version(name, champion_version)
    if champion is None:
        decision.update(champion_version=None, promoted=True, reason="first model becomes champion")
    elif str(champion.version) == version:  # a retried register step, whose earlier try crowned it
        decision.update(champion_version=version, promoted=True, reason="already champion (an earlier try)")
    else:
        champ_score, how = _champion_score(client, champion, cand_run, prepared_dir)
        decision.update(champion_version=str(champion.version), **{"champion_" + GATE_METRIC: champ_score})
        if champ_score is None:
            decision.update(promoted=False, reason=how)
        elif cand_score > champ_score:
            decision.update(promoted=True, reason=f"{cand_score:.5f} > champion's {champ_score:.5f} ({how})")
        else:
            decision.update(promoted=False, reason=f"{cand_score:.5f} <= champion's {champ_score:.5f} ({how})")
        if champ_score is not None:
            mlflow.log_metric("gate_champion_" + GATE_METRIC, champ_score)
    if decision["promoted"]:
        client.set_registered_model_alias(name, "champion", version)
    mlflow.log_metric("gate_candidate_" + GATE_METRIC, cand_score)
    mlflow.set_tags({"gate.decision": "champion" if decision["promoted"] else "challenger",
                     "gate.reason": decision["reason"]})
    mlflow.log_dict(decision, "gate/decision.json")
    log.info("promotion gate: %s", json.dumps(decision))
    return decision
