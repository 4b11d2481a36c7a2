"""End to end, the embedded default: `airflow standalone` (SQLite) and `recblr ui` (MLflow server on SQLite).

The test triggers recblr_training through Airflow's REST API with conf, waits for success, reads the new
version and its aliases through MLflow's REST API, and opens the registered model's page in headless
Chromium (screenshot kept in data/e2e/). Every process group it starts is stopped.
"""
from __future__ import annotations

import shutil

import pytest

from e2e import CONF, REPO, airflow_env, browse, champion_and_challenger, chromium, free_port, mlflow_server, \
    services, trigger_and_wait

pytestmark = pytest.mark.slow


def test_standalone_airflow_and_mlflow_server(tmp_path):
    data_dir, home = tmp_path / "data" / "toy", tmp_path / "airflow"
    api_port = free_port()
    with services(tmp_path / "logs") as group:
        mlflow_url = mlflow_server(group, data_dir, free_port())
        group.start("airflow", ["airflow", "standalone"], airflow_env(home, api_port, data_dir))
        run = trigger_and_wait(f"http://127.0.0.1:{api_port}", home,
                               {**CONF, "data_dir": str(data_dir), "tracking_uri": mlflow_url}, group, 300)
        assert [run["tasks"][t]["state"] for t in ("ingest", "train", "register")] == ["success"] * 3
        assert champion_and_challenger(mlflow_url) == {"champion": "1", "challenger": "1"}

        browser = chromium()
        if browser is None:
            pytest.skip("no chromium and it cannot be installed here (needs root and apt-get)")
        shots = REPO / "data" / "e2e"
        shots.mkdir(parents=True, exist_ok=True)
        screenshot = shots / "mlflow-registered-model.png"
        dom = browse(browser, f"{mlflow_url}/#/models/recblr-toy", screenshot, tmp_path / "chromium")
        assert screenshot.stat().st_size > 10_000
        assert "recblr" in dom and "Version 1" in dom and "champion" in dom and "challenger" in dom
        shutil.copy(screenshot, tmp_path / screenshot.name)
