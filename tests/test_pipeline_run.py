"""pipeline.run: one mapping of TrainConfig fields, checked before any step runs; steps that fail name the partition's
own files, leave its earlier outputs in place and leave no work folders behind."""
from __future__ import annotations

import dataclasses
import re

import pytest

from pipeline.errors import PipelineError
from pipeline.run import (ingest_step, partition, prepare_step, run_key_for, run_pipeline, train_config,
                          train_step)
from recblr.train import TrainConfig


def test_a_train_mapping_builds_train_config_with_none_as_its_default():
    assert train_config(None) == train_config({}) == TrainConfig()
    assert train_config({"epochs": None, "max_len": 20, "recompute": True}) == TrainConfig(max_len=20, recompute=True)
    with pytest.raises(PipelineError, match="max_len"):
        train_config({"max_len": 0})


@pytest.mark.parametrize("value", [3, None])  # a misspelt knob fails even when left unset
def test_an_unknown_train_field_fails_before_ingest_naming_it(tmp_path, value):
    with pytest.raises(PipelineError, match="no field 'epoch'"):
        run_pipeline(tmp_path / "d", train={"epoch": value, "max_len": 20})
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("model, overrides, message", [
    ("sasrc", {}, "train sasrc: unknown model 'sasrc'"),
    ("recblr", {"d_modle": 16}, r"train recblr: recblr has no config field\(s\) \['d_modle'\]"),
    ("gru4rec", {"dropout": 5.0}, r"train gru4rec: GRU4RecConfig: dropout must be in \[0, 1\)"),
])
def test_a_bad_model_or_override_fails_before_ingest_naming_it(tmp_path, model, overrides, message):
    with pytest.raises(PipelineError, match=message):
        run_pipeline(tmp_path / "d", model=model, overrides=overrides)
    assert not (tmp_path / "d").exists()


def test_every_recblr_run_option_named_as_a_train_config_field_reaches_run_pipeline(tmp_path, monkeypatch):
    from typer.main import get_command
    from typer.testing import CliRunner

    from pipeline import run
    from pipeline.cli import app
    from pipeline.launch import cli_option

    changed = {"epochs": 7, "max_len": 9, "time_budget_s": 60.0, "compile": True, "recompute": True,
               "batch_by_length": True}
    options = {p.name for p in get_command(app).commands["run"].params}
    assert options & {f.name for f in dataclasses.fields(TrainConfig)} == set(changed)
    assert all(TrainConfig.__dataclass_fields__[name].default != value for name, value in changed.items())
    given = {}

    def run_pipeline(data_dir, **kwargs):
        given.update(kwargs)
        raise PipelineError("stop before ingest")

    monkeypatch.setattr(run, "run_pipeline", run_pipeline)
    args = [cli_option(name, value) for name, value in changed.items()]
    result = CliRunner().invoke(app, ["run", "--data-dir", str(tmp_path / "d"), *args])
    assert isinstance(result.exception, PipelineError), result.output
    assert given["train"] == changed


def test_recblr_run_takes_every_ingest_option_and_hands_it_to_run_pipeline(tmp_path, monkeypatch):
    from typer.main import get_command
    from typer.testing import CliRunner

    from pipeline import run
    from pipeline.cli import app

    commands = get_command(app).commands
    ingest_options = [p for p in commands["ingest"].params if p.name not in ("source", "data_dir", "as_json")]
    run_options = {p.name: p for p in commands["run"].params}
    assert [(p.opts, p.help) for p in ingest_options] == [(run_options[p.name].opts, run_options[p.name].help)
                                                           for p in ingest_options]
    given = []

    def run_pipeline(data_dir, **kwargs):
        given.append(kwargs)
        raise PipelineError("stop before ingest")

    monkeypatch.setattr(run, "run_pipeline", run_pipeline)
    base = ["run", "--data-dir", str(tmp_path / "d"), "--source", str(tmp_path / "UserBehavior.csv")]
    options = {"behaviors": "buy,cart", "user_col": "uid", "item_col": "sku", "time_col": "ts", "rating_col": "stars",
               "behavior_col": "act", "delimiter": ";", "rating_min": 1.0, "rating_max": 5.0}
    args = [a for name, value in options.items() for a in (f"--{name.replace('_', '-')}", str(value))]
    for argv in (base, [*base, "--format", "taobao", *args]):
        assert isinstance(CliRunner().invoke(app, argv).exception, PipelineError)
    assert [(kwargs["fmt"], kwargs["format_options"]) for kwargs in given] == [("csv", {}), ("taobao", options)]


@pytest.mark.parametrize("option", ["--users", "--events-per-user"])
def test_recblr_run_refuses_a_synthetic_size_with_a_source(tmp_path, monkeypatch, option):
    from typer.testing import CliRunner

    from pipeline import run
    from pipeline.cli import app

    monkeypatch.setattr(run, "run_pipeline", lambda data_dir, **kwargs: pytest.fail("run_pipeline was called"))
    result = CliRunner().invoke(app, ["run", "--data-dir", str(tmp_path / "d"), "--source", str(tmp_path / "x.csv"),
                                      option, "300"])
    assert isinstance(result.exception, PipelineError) and option in str(result.exception)


@pytest.mark.parametrize("key", ["../../outside", "..", ".", "", "a/b"])
def test_a_run_key_that_is_not_a_plain_name_is_refused_naming_it(tmp_path, key):
    data_dir = tmp_path / "data" / "d"
    with pytest.raises(PipelineError, match=f"run key {re.escape(repr(key))}"):
        partition(data_dir, key)
    with pytest.raises(PipelineError, match="run key"):  # before anything is written
        run_pipeline(data_dir, run_key=key or "..")
    assert list(tmp_path.rglob("*")) == []
    assert partition(data_dir, run_key_for(None, "manual__2026-01-01T03:00:00+00:00")).parent == data_dir / "runs"


def _hidden(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def test_a_failed_prepare_names_the_partition_and_keeps_its_previous_output(tmp_path):
    data_dir, part = tmp_path / "d", partition(tmp_path / "d", "k")
    ingest_step(data_dir, "k", synthetic={"n_users": 60, "n_items": 40, "mean_events": 20})
    before = prepare_step(data_dir, "k")["users"]
    few = tmp_path / "few.csv"
    few.write_text("user_id,item_id,timestamp\n" + "".join(f"u{n % 3},i{n},{n}\n" for n in range(12)))
    ingest_step(data_dir, "k", str(few))
    with pytest.raises(PipelineError, match="nothing survives") as err:
        prepare_step(data_dir, "k")
    assert str(part / "events.parquet") in str(err.value) and ".tmp" not in str(err.value)
    assert _hidden(part) == []
    from recblr.data import load_prepared

    assert load_prepared(part / "prepared").n_users == before


def test_an_ingest_that_quarantines_every_row_leaves_its_quarantine_in_the_partition(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,yesterday\nu2,i2,soon\n")
    part = partition(tmp_path / "d", "k")
    with pytest.raises(PipelineError) as err:
        ingest_step(tmp_path / "d", "k", str(bad))
    assert str(part / "quarantine.parquet") in str(err.value) and ".tmp" not in str(err.value)
    import pyarrow.parquet as pq

    assert pq.read_table(part / "quarantine.parquet").column("rule").to_pylist() == ["timestamp_parses"] * 2
    assert _hidden(part) == []


def test_a_failed_training_leaves_the_previous_model_and_no_work_folder(tmp_path, monkeypatch):
    from pipeline import launch
    from recblr.train import TrainingDiverged
    from prepared_data import markov_sequences, write_prepared

    part = partition(tmp_path / "d", "k")
    write_prepared(part / "prepared", markov_sequences(8, 10, 6), 10)
    (part / "model").mkdir()
    (part / "model" / "model.pt").write_bytes(b"yesterday's weights")

    def diverge(nproc, data_dir, run_dir, model, **kwargs):
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoint.pt").write_bytes(b"half an epoch")
        raise TrainingDiverged("loss is nan in epoch 1")

    monkeypatch.setattr(launch, "fit_on_processes", diverge)
    with pytest.raises(PipelineError, match="loss is nan"):
        train_step(tmp_path / "d", "k", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _hidden(part) == [] and (part / "model" / "model.pt").read_bytes() == b"yesterday's weights"


@pytest.mark.parametrize("synthetic", [{"users": 300}, {"n_users": "300"}])
def test_a_misnamed_or_mistyped_synthetic_size_fails_before_anything_is_written(tmp_path, synthetic):
    # a TypeError from inside the generator would take the DAG task's retries; a PipelineError fails it at once
    with pytest.raises(PipelineError, match=next(iter(synthetic))):
        ingest_step(tmp_path / "d", "k", synthetic=synthetic)
    assert not (tmp_path / "d").exists()
