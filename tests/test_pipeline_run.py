"""pipeline.run's training knobs: one mapping of TrainConfig fields, checked before any step runs."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.errors import PipelineError
from pipeline.run import run_pipeline, train_config
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
