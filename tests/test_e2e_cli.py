"""`recblr run` as a user runs it: the whole pipeline without Airflow, rerun for the same run key."""
from __future__ import annotations

import json
import subprocess

import pytest
from mlflow import MlflowClient

from e2e import BIN

pytestmark = pytest.mark.slow


def recblr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "recblr"), *args], capture_output=True, text=True, timeout=300,
                          env={"PATH": str(BIN), "GX_ANALYTICS_ENABLED": "false"})


def test_run_twice_for_one_date_replaces_instead_of_adding(tmp_path):
    data_dir = tmp_path / "data" / "toy"
    args = ["run", "--data-dir", str(data_dir), "--run-key", "2026-02-01", "--users", "300", "--events-per-user",
            "10", "--epochs", "1", "--max-len", "20", "--set", "d_model=16", "--set", "n_layers=1", "--json"]
    first = recblr(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["run_key"] == "2026-02-01" and summary["version"] == "1" and summary["champion"] is True
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}"
    again = recblr(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["test_ndcg_at_10"] == pytest.approx(summary["test_ndcg_at_10"])  # seeded: the same model
    assert [p.name for p in (data_dir / "runs").iterdir()] == ["2026-02-01"]
    assert not [p for p in (data_dir / "runs" / "2026-02-01").iterdir() if p.name.startswith(".")]
    client = MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("recblr-toy").experiment_id],
                              "tags.`recblr.run_key` = '2026-02-01'")
    assert [r.info.run_id for r in runs] == [second["run_id"]]  # the first run holds the champion: kept, re-tagged
    # version 1 stays (it is the champion); the rerun's equal model does not take over
    assert second["champion"] is False, second["gate"]
    assert {a: str(client.get_model_version_by_alias("recblr-toy", a).version) for a in ("champion", "challenger")} == \
        {"champion": "1", "challenger": second["version"]}
    scored = recblr("evaluate", "--data-dir", str(data_dir), "--json")  # finds the partition's data and model
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.splitlines()[-1])["ndcg_at_10"] == pytest.approx(second["test_ndcg_at_10"])


@pytest.mark.parametrize("as_json", [False, True])
def test_bad_source_exits_2_naming_the_file(tmp_path, as_json):
    missing = tmp_path / "missing.csv"
    result = recblr("run", "--data-dir", str(tmp_path / "d"), "--source", str(missing), *["--json"] * as_json)
    assert result.returncode == 2 and str(missing) in result.stderr.replace("\n", "")
    if as_json:  # a script reading the last line gets the error instead of a parse failure
        assert str(missing) in json.loads(result.stdout.splitlines()[-1])["error"]
    else:
        assert result.stdout == ""


@pytest.mark.parametrize("option, value, named", [("--nproc-per-node", "0", "nproc_per_node"),
                                                   ("--time-budget-s", "0", "time_budget_s")])
def test_a_bad_training_option_exits_2_before_ingest(tmp_path, option, value, named):
    result = recblr("run", "--data-dir", str(tmp_path / "d"), option, value)
    assert result.returncode == 2 and named in result.stderr
    assert not (tmp_path / "d" / "runs").exists()
