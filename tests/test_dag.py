"""The Airflow DAG: its shape as the scheduler sees it, and whole runs in-process with `dag.test()`."""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Airflow reads its configuration once, at first import: point it at a private home before that.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="recblr-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ.pop("RECBLR_SCHEDULE", None)

TINY = {"synthetic": {"n_users": 300, "n_items": 200, "mean_events": 10}, "epochs": 1, "max_len": 20}
ORDER = ["ingest", "validate", "prepare", "train", "evaluate", "register"]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.initdb()
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("recblr_training")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dagrun")


def test_schedule_params_and_task_order(dag):
    assert dag.timetable.expression == "0 3 * * *" and dag.catchup is False
    params = dag.params.dump()
    for name in ("source", "format", "model", "epochs", "max_len", "nproc_per_node", "time_budget_s", "compile",
                 "recompute", "batch_by_length", "tracking_uri"):
        assert name in params
    assert params["model"] == "recblr" and params["source"] is None and params["format"] == "csv"
    assert params["nproc_per_node"] == 1  # one process: the task trains in its own process
    assert params["compile"] is False  # a compile costs more than a small nightly run saves
    assert params["recompute"] is False  # it costs time, and a small nightly run has the memory
    assert params["batch_by_length"] is False  # on six Amazon Beauty seeds it fell short of random batches
    tasks = {t.task_id: t for t in dag.tasks}
    assert sorted(tasks) == sorted(ORDER)
    for before, after in zip(ORDER, ORDER[1:]):
        assert before in tasks[after].upstream_task_ids
    assert tasks["train"].queue == "gpu"
    for name in ("ingest", "prepare", "train", "evaluate", "register"):
        assert tasks[name].retries >= 1 and tasks[name].retry_delay.total_seconds() > 0
    assert tasks["validate"].retries == 0  # the same files give the same verdict
    assert [a.name for a in tasks["prepare"].outlets] == ["recblr_prepared"]


def _load_dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recblr_training_dag", REPO / "dags" / "recblr_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_params_are_every_param_named_as_a_train_config_field(dag):
    from recblr.train import TrainConfig

    module = _load_dag_module()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert len(set(module.TRAIN_PARAMS)) == len(module.TRAIN_PARAMS)
    assert set(module.TRAIN_PARAMS) == fields & set(dag.params)


def test_bad_input_fails_at_once_and_a_tracking_outage_takes_the_retries(dag):
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import PipelineError, ServiceUnavailable

    module = _load_dag_module()

    def fails_with(error):
        return module._fail_fast(lambda: (_ for _ in ()).throw(error))

    with pytest.raises(AirflowFailException, match="bad row"):
        fails_with(PipelineError("bad row"))()
    with pytest.raises(ServiceUnavailable, match="cannot reach"):
        fails_with(ServiceUnavailable("cannot reach tracking server"))()


def test_params_reject_a_wrong_type(dag):
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.prepare import MIN_EVENTS_PER_USER

    params = copy.deepcopy(dag.params)
    params["epochs"] = 3  # a manual trigger's conf overrides the default
    assert params["epochs"] == 3
    with pytest.raises(ParamValidationError, match="many"):
        params["epochs"] = "many"
    params["nproc_per_node"] = "auto"
    for wrong in (0, "all", "2"):
        with pytest.raises(ParamValidationError):
            params["nproc_per_node"] = wrong
    params["min_count"] = MIN_EVENTS_PER_USER
    with pytest.raises(ParamValidationError):  # at trigger time, not in the prepare task
        params["min_count"] = MIN_EVENTS_PER_USER - 1
    params["time_budget_s"] = 1800.5
    for wrong in (0, -1, "soon"):
        with pytest.raises(ParamValidationError):
            params["time_budget_s"] = wrong
    for flag in ("compile", "recompute", "batch_by_length"):
        with pytest.raises(ParamValidationError):
            params[flag] = "yes"


def run(dag, workdir, day: int, **conf):
    # dag.test() in one process keeps the last run's params: spell out every param a test changes
    conf = {**TINY, "source": None, "model": "recblr", "overrides": {}, "nproc_per_node": 1, "time_budget_s": None,
            "compile": False, "recompute": False, "batch_by_length": False,
            "data_dir": str(workdir / "data" / "toy"),
            "tracking_uri": f"sqlite:///{workdir / 'data' / 'mlflow' / 'mlflow.db'}", **conf}
    return dag.test(logical_date=datetime(2026, 1, day, 3, tzinfo=timezone.utc), run_conf=conf)


def test_dag_runs_end_to_end_and_gate_keeps_a_worse_candidate(dag, workdir, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import launch
    from recblr.train import TrainConfig

    real_fit_on_processes, launched = launch.fit_on_processes, []

    def fit_on_processes(nproc, *args, **kwargs):
        launched.append((nproc, kwargs["train"]))
        return real_fit_on_processes(nproc, *args, **kwargs)

    monkeypatch.setattr(launch, "fit_on_processes", fit_on_processes)
    # the popularity model is a strong baseline on this data, one epoch of a tiny RecBLR is not
    first = run(dag, workdir, 1, model="pop")
    assert first.state == "success", {ti.task_id: ti.state for ti in first.get_task_instances()}
    # the second night trains as on a 2-GPU worker: two gloo ranks under torchrun, in a slot too short
    # for its second epoch
    second = run(dag, workdir, 2, overrides={"d_model": 16, "n_layers": 1}, nproc_per_node=2, epochs=2,
                 time_budget_s=1e-3, recompute=True, batch_by_length=True)
    assert second.state == "success", {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert [nproc for nproc, _ in launched] == [1, 2]
    # every knob of the trigger's conf reaches the TrainConfig that training runs with
    assert launched[1][1] == TrainConfig(epochs=2, max_len=TINY["max_len"], time_budget_s=1e-3, recompute=True,
                                         batch_by_length=True)
    client = MlflowClient(f"sqlite:///{workdir / 'data' / 'mlflow' / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("recblr-toy", "champion")  # named after the dataset
    challenger = client.get_model_version_by_alias("recblr-toy", "challenger")
    assert (str(champion.version), str(challenger.version)) == ("1", "2")
    gate = client.get_run(challenger.run_id).data
    assert gate.tags["gate.decision"] == "challenger"
    assert gate.metrics["gate_candidate_test_ndcg_at_10"] < gate.metrics["gate_champion_test_ndcg_at_10"]
    assert gate.params["model"] == "recblr" and gate.params["config.d_model"] == "16"
    assert gate.tags["recblr.stopped"] == "time budget" and gate.params["train.time_budget_s"] == "0.001"
    assert gate.params["train.recompute"] == "True"
    # what made the data, from the partition's records: the train task gets it from no other task
    assert (gate.params["run_key"], gate.params["nproc_per_node"]) == ("2026-01-02", "2")
    assert gate.params["ingest.format"] == "csv" and gate.params["ingest.synthetic.n_users"] == "300"
    partition = workdir / "data" / "toy" / "runs" / "2026-01-02"
    assert gate.params["ingest.source"] == str(partition / "raw" / "synthetic.csv")
    assert (gate.params["validate.max_quarantined"], gate.params["prepare.min_count"]) == ("0.05", "5")
    assert {"val_ndcg_at_10", "loss", "test_ndcg_at_10"} <= set(gate.metrics)
    artifacts = {a.path for a in client.list_artifacts(challenger.run_id)}
    assert {"plots", "metrics", "item_map", "data"} <= artifacts
    data = workdir / "data" / "toy"
    assert sorted(p.name for p in (data / "runs").iterdir()) == ["2026-01-01", "2026-01-02"]
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        extras = [e.extra for e in session.scalars(select(AssetEvent).order_by(AssetEvent.id))]
    assert [e["run_key"] for e in extras] == ["2026-01-01", "2026-01-02"]
    assert extras[1]["path"] == str(data / "runs" / "2026-01-02" / "prepared")
    assert extras[0]["digest"] == extras[1]["digest"]  # same data both nights: the gate compares like with like


def test_bad_input_fails_its_task_at_once_with_the_pipeline_error(dag, workdir, capfd):
    missing = workdir / "nowhere.csv"
    result = run(dag, workdir, 3, source=str(missing))
    states = {ti.task_id: ti for ti in result.get_task_instances()}
    assert result.state == "failed" and states["ingest"].state == "failed"
    assert states["ingest"].try_number == 1  # a PipelineError is not retried
    assert states["train"].state == "upstream_failed"
    assert str(missing) in capfd.readouterr().out


@pytest.mark.parametrize("day, setting, message", [
    (4, {"model": "sasrc"}, "train sasrc: unknown model 'sasrc'"),
    (5, {"overrides": {"d_modle": 16}}, "train recblr: recblr has no config field(s) ['d_modle']"),
])
def test_a_bad_model_or_override_fails_the_first_task_before_any_data_is_read(dag, workdir, capfd, day, setting,
                                                                             message):
    result = run(dag, workdir, day, **setting)
    states = {ti.task_id: ti for ti in result.get_task_instances()}
    assert result.state == "failed" and states["ingest"].state == "failed" and states["ingest"].try_number == 1
    assert states["validate"].state == "upstream_failed"
    assert not (workdir / "data" / "toy" / "runs" / f"2026-01-0{day}").exists()
    assert message in capfd.readouterr().out  # the message `recblr run` gives
