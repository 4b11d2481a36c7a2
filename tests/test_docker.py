"""docker/: the compose file validates (with Compose itself where it can be had) and has the production shape."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "compose.yaml"


def compose_cli() -> list[str] | None:
    """`docker compose` when the plugin works, else Debian's docker-compose (installed when we are root)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if not shutil.which("docker-compose") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker-compose"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_validates_and_needs_the_env_file(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is available (the YAML checks below still run)")
    ok = subprocess.run([*cli, "--env-file", str(DOCKER / ".env.example"), "-f", str(COMPOSE), "config"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert resolved["services"]["worker-gpu"]["command"][-3:] == ["gpu", "--concurrency", "1"]
    # no password is baked in: without the env file, Compose refuses the file
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.endswith(("PASSWORD", "SECRET"))}
    missing = subprocess.run([*cli, "--env-file", str(empty), "-f", str(COMPOSE), "config"], capture_output=True,
                             text=True, cwd=tmp_path, env=env)
    assert missing.returncode != 0 and "set it in docker/.env" in missing.stderr + missing.stdout


def test_services_of_the_production_shape(spec):
    services = spec["services"]
    assert {"postgres", "redis", "airflow-init", "api-server", "scheduler", "dag-processor", "worker", "worker-gpu",
            "mlflow"} <= set(services)
    env = services["scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    gpu = services["worker-gpu"]
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker"]["command"][services["worker"]["command"].index("--queues") + 1] == "default"
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql")
    assert "mlflow-artifacts:/mlartifacts" in services["mlflow"]["volumes"]
    assert "FROM nvidia/cuda" in (DOCKER / "Dockerfile.gpu").read_text()


def test_no_secret_is_baked_in_and_ports_stay_on_loopback(spec):
    text = COMPOSE.read_text()
    # every credential in a URL or a *_PASSWORD/*_SECRET variable is an interpolation from docker/.env
    for user, password in re.findall(r"://(\w+):([^@\s]+)@", text):
        assert password.startswith("${"), f"{user}'s password is written into compose.yaml"
    for name, value in re.findall(r"(\w*(?:PASSWORD|SECRET)\w*): (\S+)", text):
        assert value.startswith("${"), f"{name} is written into compose.yaml"
    for service in spec["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example.values()) == {"replace-me"}
    assert set(re.findall(r"\$\{(\w+):\?", text)) == set(example)


def test_both_images_pin_the_same_torch_and_airflow():
    # the scheduler, CPU worker and GPU worker share the DAG and the model files: loose ranges would let two builds
    # on different days drift apart
    pins = {}
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        (args,) = re.findall(r"^ARG (TORCH_VERSION=\S+ AIRFLOW_VERSION=\S+)$", text, re.M)
        pins[name] = args
        assert re.search(r"pip install torch==\$\{TORCH_VERSION\}", text)
        assert re.search(r"pip install -e '\.\[production\]' apache-airflow==\$\{AIRFLOW_VERSION\}", text)
    assert pins["Dockerfile"] == pins["Dockerfile.gpu"], pins
