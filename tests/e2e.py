"""Helpers of the end-to-end tests: free ports, process groups that always stop, and the two REST APIs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DAG_ID = "recblr_training"
# tiny on purpose: each end-to-end test must finish in a few minutes on 2 cores
CONF = {"synthetic": {"n_users": 300, "n_items": 200, "mean_events": 10}, "epochs": 1, "max_len": 20,
        "overrides": {"d_model": 16, "n_layers": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """Processes started in their own process groups, logging to files; `stop()` ends every group."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.logs)
        self.procs[name] = proc
        return proc

    def tail(self, lines: int = 40) -> str:
        text = []
        for name in self.procs:
            log = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {name} ---\n" + "\n".join(log))
        return "\n".join(text)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.tail()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # children that outlived their parent (gunicorn/uvicorn workers, celery forks)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@contextmanager
def services(logs: Path):
    group = Services(logs)
    try:
        yield group
    finally:
        group.stop()


def http(method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 10) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def wait_until(what: str, check, group: Services, timeout: float) -> object:
    """Poll `check()` until it returns something truthy without raising; fail with the services' logs."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        group.check_alive()
        try:
            value = check()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, OSError, KeyError, ValueError) as err:
            last = err
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last: {last!r})\n{group.tail()}")


def airflow_env(home: Path, api_port: int, data_dir: Path, **extra: str) -> dict:
    """Environment every Airflow process of one test shares (same home, same JWT secret, loopback only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    env.update({
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "RECBLR_DATA_DIR": str(data_dir),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "RECBLR_RETRY_DELAY_S": "5",
        "RECBLR_SCHEDULE": "",  # manual only: unpausing a cron DAG would start the latest nightly run too
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def airflow_token(home: Path, api: str) -> str:
    passwords = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
    body = http("POST", f"{api}/auth/token", {"username": "admin", "password": passwords["admin"]})
    return body["access_token"]


def trigger_and_wait(api: str, home: Path, conf: dict, group: Services, timeout: float) -> dict:
    """Trigger the DAG through the REST API (as a user would), wait for the run to finish; return it."""
    token = wait_until("Airflow auth", lambda: airflow_token(home, api), group, 60)
    wait_until("DAG parsed", lambda: http("GET", f"{api}/api/v2/dags/{DAG_ID}", token=token)["dag_id"], group, 90)
    http("PATCH", f"{api}/api/v2/dags/{DAG_ID}", {"is_paused": False}, token=token)
    run = http("POST", f"{api}/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf}, token=token)
    url = f"{api}/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}"
    done = wait_until("DAG run finished",
                      lambda: (r := http("GET", url, token=token))["state"] in ("success", "failed") and r,
                      group, timeout)
    if done["state"] != "success":
        tasks = http("GET", f"{url}/taskInstances", token=token)["task_instances"]
        raise AssertionError(f"run {done['dag_run_id']} {done['state']}: "
                             f"{ {t['task_id']: t['state'] for t in tasks} }\n{group.tail(80)}")
    tasks = http("GET", f"{url}/taskInstances", token=token)["task_instances"]
    return {**done, "tasks": {t["task_id"]: t for t in tasks}}


def mlflow_server(group: Services, data_dir: Path, port: int, tracking_uri: str | None = None,
                  artifacts: Path | None = None) -> str:
    """`recblr ui` started as a user would; returns its URL once /health answers."""
    cmd = [str(BIN / "recblr"), "ui", "--data-dir", str(data_dir), "--port", str(port)]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri, "--artifacts", str(artifacts)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")}
    group.start("mlflow", cmd, {**env, "PATH": f"{BIN}:{env.get('PATH', '')}"})
    url = f"http://127.0.0.1:{port}"
    wait_until("MLflow server", lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200, group, 90)
    return url


def champion_and_challenger(mlflow_url: str, name: str = "recblr-toy") -> dict:
    """Read the registered model back through MLflow's REST API: {alias: version}."""
    model = http("GET", f"{mlflow_url}/api/2.0/mlflow/registered-models/get?name={name}")["registered_model"]
    return {a["alias"]: a["version"] for a in model.get("aliases", [])}


def chromium() -> str | None:
    """Debian's chromium, installed here when missing and we are root; None when it cannot be had."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            return None
    return shutil.which("chromium")


def browse(browser: str, url: str, screenshot: Path, profile: Path) -> str:
    """Render `url` headless (flags that work on a machine without network), keep a screenshot, return the DOM."""
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, timeout=120, check=True,
                          text=True).stdout
