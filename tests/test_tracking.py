"""MLflow side without Airflow: the pyfunc round trip, the champion gate, and run replacement per run key."""
from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline import run, tracking
from pipeline.errors import PipelineError, ServiceUnavailable
from prepared_data import write_prepared
from recblr import models

N_ITEMS = 30


def tracking_prepared(folder: Path, seed: int = 0, sku: str = "sku") -> Path:
    """Eight users of random 5-10 events over raw ids sku-7, sku-14, ... (sku names the vocabulary)."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, N_ITEMS + 1, size=rng.integers(5, 11)).tolist() for _ in range(8)]
    return write_prepared(folder, sequences, N_ITEMS, [f"{sku}-{i * 7}" for i in range(1, N_ITEMS + 1)])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def shared_store(root):
    # one SQLite store for the module: creating one runs MLflow's migrations (~5 s)
    return tracking.default_tracking_uri(root / "data" / "toy")


@pytest.fixture
def store(shared_store):
    yield shared_store
    mlflow.end_run()


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    return models.save(models.build("recblr", N_ITEMS, d_model=16, n_layers=1), tmp_path / "model.pt")


def candidate(uri, prepared, weights, run_key, ndcg, name):
    """A run as the pipeline leaves it before registering: tagged, with its test metric; then what the register step
    does: register, gate, replace the run key's earlier runs."""
    tracking.start_training_run(uri, name, run_key, prepared)
    tracking.log_evaluation({"ndcg_at_10": ndcg}, {"ndcg_at_10": ndcg})
    version = tracking.register(weights, prepared, name)
    decision = tracking.promote(name, version, prepared)
    run_id = mlflow.active_run().info.run_id
    tracking.replace_earlier_runs(run_id)
    mlflow.end_run()
    return decision, run_id


def test_default_store_is_sqlite_beside_the_datasets(root, store, monkeypatch):
    assert store == f"sqlite:///{(root / 'data' / 'mlflow' / 'mlflow.db').resolve()}"
    experiment = MlflowClient(store).get_experiment(tracking.use_experiment(store, "other"))
    assert experiment.name == "recblr-other"
    assert experiment.artifact_location == (root / "data" / "mlflow" / "artifacts").resolve().as_uri()
    from_env = f"sqlite:///{root / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", from_env)
    assert tracking.resolve_tracking_uri(root / "data" / "toy") == from_env
    assert tracking.resolve_tracking_uri(root / "data" / "toy", "sqlite:///x.db") == "sqlite:///x.db"
    assert not (root / "env.db").exists()  # resolving checks the store, it creates none


@pytest.fixture
def closed_port():
    """A loopback port nobody listens on: bound by the OS, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(status: int, body: str):
    """A local HTTP server answering every GET with `status` and `body`; yields (its URL, the paths asked for)."""
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):  # keep pytest's output to the test's own
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(30)  # MLflow's own client would retry with backoff for minutes
def test_an_unreachable_server_is_one_error_naming_it_wherever_the_store_is_opened(tmp_path, closed_port,
                                                                                    monkeypatch):
    url = f"http://127.0.0.1:{closed_port}"
    refused = rf"cannot reach tracking server {re.escape(url)}: Connection refused"
    with pytest.raises(ServiceUnavailable, match=refused):  # the DAG retries this one, not bad input
        tracking.check_store(url)
    with pytest.raises(PipelineError, match=refused):  # compare and the train step open the store here
        tracking.use_experiment(url, "toy")
    with pytest.raises(PipelineError, match=refused):
        run.train_step(tmp_path / "d", "2026-01-01", url)
    with pytest.raises(PipelineError, match=refused):  # `recblr run`: before ingest does any work
        run.run_pipeline(tmp_path / "fresh", tracking_uri=url)
    assert not (tmp_path / "fresh" / "runs").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the DAG's tasks and `recblr recommend`/`ui` resolve it
    with pytest.raises(PipelineError, match=refused):
        tracking.resolve_tracking_uri(tmp_path / "d")


def test_a_server_that_accepts_but_never_answers_fails_after_the_probe_timeout():
    with socket.socket() as silent:  # the kernel completes connections to a listening socket; nothing answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServiceUnavailable, match=rf"{re.escape(url)} did not answer GET {re.escape(url)}/health "
                                                r"within 0\.2 s"):
            tracking.check_store(url, timeout=0.2)


@pytest.mark.parametrize("status, body, mlflow_like", [
    (200, "OK", True),
    (401, "login first", True),  # an authenticating proxy in front: reachable, MLflow sends the credentials
    (403, "", True),
    (404, "<html>Not Found</html>", False),  # some other web server on that port
    (200, "<!doctype html><title>Airflow</title>", False),  # a UI that answers every path
    (502, "Bad Gateway", False),  # a proxy whose MLflow is down
])
def test_only_mlflows_health_answer_passes_the_probe(status, body, mlflow_like):
    with http_server(status, body) as (url, asked):
        uri = f"{url}/mlflow/"  # a server behind a path prefix answers /health under it
        if mlflow_like:
            assert tracking.check_store(uri) == uri
        else:
            with pytest.raises(PipelineError, match=rf"{re.escape(uri)} is not an MLflow tracking server.*"
                                                    rf"HTTP {status}") as err:
                tracking.check_store(uri)
            assert not isinstance(err.value, ServiceUnavailable)  # a wrong URI: no retry will fix it
    assert asked == ["/mlflow/health"]


def test_a_sqlite_store_must_exist_to_be_read_and_be_makeable_to_be_written(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir = tmp_path / "data" / "shop"
    typo = tmp_path / "data" / "mlflow" / "mlfow.db"
    (tmp_path / "data" / "mlflow").mkdir(parents=True)
    with pytest.raises(PipelineError, match=rf"no tracking store at {re.escape(str(typo))}: no such file; .*"
                                            rf"default store of .* is {re.escape(str(typo.with_name('mlflow.db')))}"):
        tracking.resolve_tracking_uri(data_dir, f"sqlite:///{typo}", must_exist=True)
    with pytest.raises(PipelineError, match=r"no tracking store at .*mlflow\.db: no such file; `recblr run"):
        tracking.resolve_tracking_uri(tmp_path / "elsewhere" / "shop", must_exist=True)  # the default store
    assert not typo.exists() and not (tmp_path / "elsewhere").exists()
    new = tmp_path / "new" / "folder" / "mlflow.db"
    for writable in (typo, new):  # a writer's first run creates the store, and its folders
        assert tracking.check_store(f"sqlite:///{writable}") == f"sqlite:///{writable}"
    assert not typo.exists() and not new.parent.parent.exists()
    not_sqlite = tmp_path / "events.csv"
    not_sqlite.write_text("user,item\n1,2\n")
    under_a_file = not_sqlite / "mlflow" / "mlflow.db"
    unmakeable = rf"cannot create the store's folder {re.escape(str(under_a_file.parent))}: .* is a file"
    for opening in (tracking.check_store, lambda uri: tracking.use_experiment(uri, "shop")):
        with pytest.raises(PipelineError, match=unmakeable):
            opening(f"sqlite:///{under_a_file}")
    with pytest.raises(PipelineError, match="is not a SQLite database"):
        tracking.check_store(f"sqlite:///{not_sqlite}", must_exist=True)
    with pytest.raises(PipelineError, match="is a folder; name the SQLite file"):
        tracking.check_store(f"sqlite:///{tmp_path}")
    with pytest.raises(PipelineError, match="sqlite:mlflow.db: not a SQLite URL"):
        tracking.check_store("sqlite:mlflow.db")


def test_flatten_nested_config():
    assert tracking.flatten("", {"config": {"d_model": 16, "opt": {"lr": 1e-3}}, "model": "recblr"}) == {
        "config.d_model": 16, "config.opt.lr": 1e-3, "model": "recblr"}


def test_pyfunc_serves_variable_length_histories(tmp_path, store, weights):
    prepared = tracking_prepared(tmp_path / "prepared")
    decision, run_id = candidate(store, prepared, weights, "2026-01-01", 0.1, "serve")
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/serve@champion", tracking_uri=store))
    # model from code: no pickled Python object in the model folder, the weights are a plain torch file
    assert not list(model_dir.rglob("*.pkl")) and (model_dir / "artifacts" / "model.pt").is_file()
    served = mlflow.pyfunc.load_model("models:/serve@champion")
    assert served.metadata.signature.inputs.to_dict()[0]["type"] == "array"
    histories = [["sku-7", "sku-14", "sku-21", "sku-28", "sku-35"], ["sku-70"], ["sku-7", "unknown", "sku-63"]]
    out = served.predict(pd.DataFrame({"history": histories}), params={"k": 5})
    assert list(out.columns) == ["item_ids", "scores", "fallback"] and len(out) == 3
    vocab = set(pd.read_parquet(prepared / "items.parquet")["item_id"])
    for ids, scores in zip(out["item_ids"], out["scores"]):
        assert len(ids) == 5 and set(ids) <= vocab and list(scores) == sorted(scores, reverse=True)
    # the scores are the model's own at the last real position, unknown items dropped
    model = models.load(weights)
    with torch.no_grad():
        logits = model.scores(model(torch.tensor([[1, 9]]))[0, -1])
    expected = logits[1:].topk(5)
    assert out["item_ids"][2] == [f"sku-{(i + 1) * 7}" for i in expected.indices.tolist()]
    np.testing.assert_allclose(out["scores"][2], expected.values.numpy(), rtol=1e-5)


def test_gate_keeps_a_worse_candidate_as_challenger(tmp_path, store, weights):
    prepared = tracking_prepared(tmp_path / "prepared")
    first, _ = candidate(store, prepared, weights, "2026-01-01", 0.20, "gate")
    assert first["promoted"] and first["champion_version"] is None
    worse, worse_run = candidate(store, prepared, weights, "2026-01-02", 0.15, "gate")
    client = MlflowClient(store)
    assert not worse["promoted"]
    assert str(client.get_model_version_by_alias("gate", "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias("gate", "challenger").version) == worse["version"]
    logged = client.get_run(worse_run).data
    assert logged.metrics["gate_candidate_test_ndcg_at_10"] == 0.15
    assert logged.metrics["gate_champion_test_ndcg_at_10"] == 0.20
    assert logged.tags["gate.decision"] == "challenger"
    better, _ = candidate(store, prepared, weights, "2026-01-03", 0.25, "gate")
    assert better["promoted"] and str(client.get_model_version_by_alias("gate", "champion").version) == better["version"]


def test_gate_rescores_the_champion_on_the_candidates_data(tmp_path, store, weights):
    from recblr.data import load_prepared
    from recblr.evaluate import evaluate

    first, _ = candidate(store, tracking_prepared(tmp_path / "a", seed=0), weights, "2026-01-01", 0.10, "split")
    new_night = tracking_prepared(tmp_path / "b", seed=1)
    rescored = evaluate(models.load(weights), load_prepared(new_night), "test", progress=False)["ndcg_at_10"]
    assert rescored != 0.10  # the champion's logged number is not the one to compare with
    worse, worse_run = candidate(store, new_night, weights, "2026-01-02", rescored - 0.01, "split")
    assert not worse["promoted"] and "re-scored" in worse["reason"]
    assert MlflowClient(store).get_run(worse_run).data.metrics["gate_champion_test_ndcg_at_10"] == pytest.approx(rescored)
    better, _ = candidate(store, new_night, weights, "2026-01-03", rescored + 0.01, "split")
    assert better["promoted"]
    assert str(MlflowClient(store).get_model_version_by_alias("split", "champion").version) == better["version"]


def test_gate_keeps_the_champion_when_it_knows_none_of_the_items(tmp_path, store, weights):
    first, _ = candidate(store, tracking_prepared(tmp_path / "a"), weights, "2026-01-01", 0.10, "vocab")
    other, _ = candidate(store, tracking_prepared(tmp_path / "b", sku="other"), weights, "2026-01-02", 0.90, "vocab")
    assert not other["promoted"] and "knows none of this data's items" in other["reason"]
    assert str(MlflowClient(store).get_model_version_by_alias("vocab", "champion").version) == first["version"]


def test_gate_rescores_the_champion_through_raw_ids_when_new_data_renumbers_the_items(tmp_path, store, weights):
    from recblr.data import load_prepared
    from recblr.evaluate import evaluate

    old = tracking_prepared(tmp_path / "old")
    sequences, raw = _sequences_and_ids(old)
    on_old = evaluate(models.load(weights), load_prepared(old), "test", progress=False)["ndcg_at_10"]
    assert on_old > 0
    candidate(store, old, weights, "2026-01-01", on_old, "grown")
    # the next night: item indices reversed (counts moved) and a new item in a history, which the champion drops
    reverse = {i: N_ITEMS + 1 - i for i in range(1, N_ITEMS + 1)}
    night = [[reverse[i] for i in seq] for seq in sequences]
    night[0].insert(0, N_ITEMS + 1)
    ids = [raw[N_ITEMS + 1 - i] for i in range(1, N_ITEMS + 1)] + ["sku-new"]
    renumbered = write_prepared(tmp_path / "renumbered", night, N_ITEMS + 1, ids)
    decision, _ = candidate(store, renumbered, weights, "2026-01-02", on_old - 1e-4, "grown")
    assert not decision["promoted"]
    assert "through its own item ids, 1 of this data's items new to it)" in decision["reason"]
    assert decision["champion_test_ndcg_at_10"] == pytest.approx(on_old)  # the same ranking of the same users
    # a target the champion never saw is a miss: every user ending on the new item scores 0
    for seq in night:
        seq[-1] = N_ITEMS + 1
    new_targets = write_prepared(tmp_path / "new_targets", night, N_ITEMS + 1, ids)
    decision, _ = candidate(store, new_targets, weights, "2026-01-03", 1e-6, "grown")
    assert decision["promoted"] and decision["champion_test_ndcg_at_10"] == 0


def _sequences_and_ids(prepared: Path) -> tuple[list[list[int]], list]:
    """Each user's whole sequence (dense indices) and the raw id of each index (index 0: None)."""
    from recblr.data import ids_by_index, load_prepared

    data = load_prepared(prepared)
    whole = data.history.append(data.valid_item).append(data.test_item)
    return [whole.flat[a:b].tolist() for a, b in zip(whole.offsets[:-1], whole.offsets[1:])], \
        list(ids_by_index(prepared / "items.parquet"))


def test_rerun_of_a_run_key_replaces_its_mlflow_run_once_registered(tmp_path, store):
    prepared = tracking_prepared(tmp_path / "prepared")
    ids = []
    for _ in range(2):
        ids.append(tracking.start_training_run(store, "toy", "2026-01-01", prepared))
        tracking.log_epoch(1, {"epoch": 1, "loss": 2.0, "val_ndcg_at_10": 0.1})
        mlflow.end_run()
    client = MlflowClient(store)
    experiment = tracking.use_experiment(store, "toy")
    assert {r.info.run_id for r in client.search_runs([experiment])} == set(ids)  # the rerun has not replaced yet
    tracking.replace_earlier_runs(ids[1])
    assert [r.info.run_id for r in client.search_runs([experiment])] == [ids[1]]
    run = client.get_run(ids[1])
    assert run.data.metrics["val_ndcg_at_10"] == 0.1
    assert run.inputs.dataset_inputs[0].dataset.digest == tracking.dataset_digest(prepared)


def test_rerun_of_a_run_key_keeps_the_run_of_the_champion(tmp_path, store, weights):
    prepared = tracking_prepared(tmp_path / "prepared")
    first, first_run = candidate(store, prepared, weights, "2026-01-01", 0.2, "rerun")
    assert first["promoted"]
    worse, again = candidate(store, prepared, weights, "2026-01-01", 0.1, "rerun")
    assert not worse["promoted"]
    client = MlflowClient(store)
    kept = client.get_run(first_run)  # the serving model's metrics and gate decision stay browsable
    assert kept.info.lifecycle_stage == "active" and kept.data.metrics["test_ndcg_at_10"] == 0.2
    assert kept.data.tags[tracking.RUN_KEY_TAG] == "2026-01-01 (replaced)"
    assert str(client.get_model_version_by_alias("rerun", "champion").version) == first["version"]
    live = client.search_runs([tracking.use_experiment(store, "rerun")],
                              f"tags.`{tracking.RUN_KEY_TAG}` = '2026-01-01'")
    assert [r.info.run_id for r in live] == [again]


TINY_LOG = {"n_users": 100, "n_items": 50, "mean_events": 10}


def night(root, store, dataset, run_key, **settings):
    """`recblr run` of the popularity model, by default on a tiny synthetic log: the whole pipeline in about a
    second."""
    return run.run_pipeline(root / "data" / dataset, run_key=run_key, model="pop", train={"epochs": 1, "max_len": 20},
                            tracking_uri=store, **{"synthetic": TINY_LOG, **settings})


def test_a_rerun_whose_training_fails_leaves_the_earlier_run_and_its_version(root, store, monkeypatch):
    from pipeline import launch
    from recblr.train import TrainingDiverged

    night(root, store, "refail", "2026-01-01")
    earlier = night(root, store, "refail", "2026-01-02")
    assert not earlier["register"]["promoted"]  # the same data and model: a challenger, which no champion rule keeps
    real_fit = launch.fit_on_processes

    def diverge(*args, **kwargs):
        raise TrainingDiverged("loss is nan in epoch 1")

    monkeypatch.setattr(launch, "fit_on_processes", diverge)
    with pytest.raises(PipelineError, match="loss is nan"):
        night(root, store, "refail", "2026-01-02")
    client = MlflowClient(store)
    kept = client.get_run(earlier["train"]["run_id"])
    assert kept.info.lifecycle_stage == "active" and kept.data.tags[tracking.RUN_KEY_TAG] == "2026-01-02"
    assert kept.data.metrics["test_ndcg_at_10"] == earlier["evaluate"]["test"]["ndcg_at_10"]
    version = client.get_model_version_by_alias("recblr-refail", "challenger")
    assert (str(version.version), version.run_id) == (earlier["register"]["version"], earlier["train"]["run_id"])
    # the next rerun that gets through the register step replaces both the earlier run and the failed one
    monkeypatch.setattr(launch, "fit_on_processes", real_fit)
    latest = night(root, store, "refail", "2026-01-02")
    live = client.search_runs([client.get_experiment_by_name("recblr-refail").experiment_id],
                              f"tags.`{tracking.RUN_KEY_TAG}` = '2026-01-02'")
    assert [r.info.run_id for r in live] == [latest["train"]["run_id"]]
    assert [v.version for v in client.search_model_versions(f"run_id = '{earlier['train']['run_id']}'")] == []


def test_a_retried_register_step_reuses_the_version_of_its_run(root, store, monkeypatch):
    client = MlflowClient(store)
    real_promote = tracking.promote

    def promote_fails(*args, **kwargs):  # a tracking server blip after the version was registered
        raise mlflow.exceptions.MlflowException("registry unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(tracking, "promote", promote_fails)
    with pytest.raises(mlflow.exceptions.MlflowException, match="unavailable"):
        night(root, store, "retry", "2026-01-01")
    monkeypatch.setattr(tracking, "promote", real_promote)
    (failed,) = client.search_runs([client.get_experiment_by_name("recblr-retry").experiment_id])
    run_id = failed.info.run_id
    model_path = str(root / "data" / "retry" / "runs" / "2026-01-01" / "model" / "model.pt")
    registered = [str(v.version) for v in client.search_model_versions(f"run_id = '{run_id}'")]
    assert registered == ["1"]
    # Airflow retries the task: the same version, then the gate; and again, as after a failure past the gate
    for _ in range(2):
        decision = run.register_step(root / "data" / "retry", "2026-01-01", store, run_id, model_path)
        assert (decision["version"], decision["promoted"]) == ("1", True)
    assert [str(v.version) for v in client.search_model_versions(f"run_id = '{run_id}'")] == registered
    assert client.get_run(run_id).data.tags["gate.decision"] == "champion"


def test_a_metric_key_means_one_thing(root, store):
    run_id = night(root, store, "keys", "2026-01-01")["train"]["run_id"]
    client = MlflowClient(store)
    # train_seconds is each epoch's (steps 1..N), fit_seconds the whole fit's: the UI shows a key's last step
    assert [m.step for m in client.get_metric_history(run_id, "train_seconds")] == [1]
    assert [m.step for m in client.get_metric_history(run_id, "fit_seconds")] == [0]
    # valid_* is the saved model, the best epoch's, scored again by the evaluate step
    metrics = client.get_run(run_id).data.metrics
    (at_best,) = [m.value for m in client.get_metric_history(run_id, "val_ndcg_at_10")
                  if m.step == metrics["best_epoch"]]
    assert metrics["valid_ndcg_at_10"] == pytest.approx(at_best)


def test_a_run_logs_what_made_its_data(root, store, tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "orders.csv"
    rows = [f"u{u};sku{rng.integers(20)};{1_700_000_000 + 60 * n}" for u in range(30) for n in range(8)]
    source.write_text("\n".join(["uid;sku;ts", *rows, "u0;sku1;soon"]) + "\n")  # the last row is quarantined
    options = {"user_col": "uid", "item_col": "sku", "time_col": "ts", "delimiter": ";"}
    out = night(root, store, "made", "2026-01-01", source=str(source), format_options=options, min_count=4,
                max_quarantined=0.2)
    run_id = out["train"]["run_id"]
    client = MlflowClient(store)
    params = client.get_run(run_id).data.params
    assert {key: value for key, value in params.items() if key.split(".")[0] in tracking.DATA_PARAMS} == {
        "ingest.source": str(source), "ingest.format": "csv", "ingest.format_options.user_col": "uid",
        "ingest.format_options.item_col": "sku", "ingest.format_options.time_col": "ts",
        "ingest.format_options.delimiter": ";", "ingest.rows_in": "241", "ingest.rows_kept": "240",
        "ingest.rows_quarantined": "1", "ingest.rows_filtered": "0", "validate.max_quarantined": "0.2",
        "prepare.min_count": "4", "prepare.users": str(out["prepare"]["users"]),
        "prepare.items": str(out["prepare"]["items"]), "prepare.interactions": str(out["prepare"]["interactions"])}
    assert (params["run_key"], params["nproc_per_node"]) == ("2026-01-01", "1")
    part = root / "data" / "made" / "runs" / "2026-01-01"
    assert json.loads((part / "ingest.json").read_text())["format_options"] == options  # the partition keeps them
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data", dst_path=str(tmp_path)))
    assert json.loads((logged / "validate.json").read_text())["max_quarantined"] == 0.2
    assert sorted(p.name for p in logged.iterdir()) == ["ingest.json", "summary.json", "validate.json"]


def test_ui_json_names_the_loopback_url_and_serves_the_default_store(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    execs = []
    monkeypatch.setattr("os.execv", lambda path, argv: execs.append(argv))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["ui", "--data-dir", str(tmp_path / "shop"), "--port", "5123", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["url"] == "http://127.0.0.1:5123"
    assert line["tracking_uri"] == tracking.resolve_tracking_uri(tmp_path / "shop", None)
    (argv,) = execs
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert line["tracking_uri"] in argv


def test_gate_rescores_a_champion_whose_run_logged_no_metric(tmp_path, store, weights):
    prepared = tracking_prepared(tmp_path / "prepared")
    tracking.start_training_run(store, "bare", "2026-01-01", prepared)  # made champion by hand, never evaluated
    version = tracking.register(weights, prepared, "bare")
    mlflow.end_run()
    MlflowClient(store).set_registered_model_alias("bare", "champion", version)
    decision, _ = candidate(store, prepared, weights, "2026-01-02", 0.99, "bare")
    assert decision["promoted"] and "re-scored" in decision["reason"]
    assert decision["champion_test_ndcg_at_10"] is not None


def test_gate_keeps_the_champion_when_the_registry_fails_to_answer(tmp_path, store, weights, monkeypatch):
    prepared = tracking_prepared(tmp_path / "prepared")
    first, _ = candidate(store, prepared, weights, "2026-01-01", 0.30, "flaky")
    tracking.start_training_run(store, "flaky", "2026-01-02", prepared)
    tracking.log_evaluation({"ndcg_at_10": 0.01}, {"ndcg_at_10": 0.01})
    version = tracking.register(weights, prepared, "flaky")

    def failing_for_the_gate(lookup):
        real = getattr(MlflowClient, lookup)

        def answer(*args, **kwargs):  # MLflow's own calls still get answers, so only the gate's lookup fails
            if sys._getframe(1).f_globals["__name__"] == tracking.__name__:
                raise mlflow.exceptions.MlflowException("registry unavailable", error_code="TEMPORARILY_UNAVAILABLE")
            return real(*args, **kwargs)
        return answer

    for lookup in ("get_registered_model", "get_model_version_by_alias"):  # either way to find the champion
        monkeypatch.setattr(MlflowClient, lookup, failing_for_the_gate(lookup))
    with pytest.raises(mlflow.exceptions.MlflowException, match="unavailable"):
        tracking.promote("flaky", version, prepared)
    monkeypatch.undo()
    assert str(MlflowClient(store).get_model_version_by_alias("flaky", "champion").version) == first["version"]
