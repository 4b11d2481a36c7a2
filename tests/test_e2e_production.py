"""End to end, the production shape: Airflow on PostgreSQL with the CeleryExecutor (Redis broker), a worker
on the default queue and one on `gpu` (the train task), and the MLflow server on a PostgreSQL store.

PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) are services of the machine; the test
creates its own databases there and drops them afterwards, and stops every process group it starts.
"""
from __future__ import annotations

import random
import socket
import subprocess
import uuid

import pytest

from e2e import CONF, airflow_env, champion_and_challenger, free_port, mlflow_server, services, trigger_and_wait

pytestmark = pytest.mark.slow
PG = "postgres@127.0.0.1:5432"


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def databases():
    if not (reachable(5432) and reachable(6379)):
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
    import psycopg2
    import redis

    suffix = uuid.uuid4().hex[:8]
    names = {"airflow": f"recblr_e2e_airflow_{suffix}", "mlflow": f"recblr_e2e_mlflow_{suffix}"}
    conn = psycopg2.connect(f"postgresql://{PG}/postgres")
    conn.autocommit = True
    broker = redis.Redis("127.0.0.1", 6379, db=random.randint(1, 15))
    try:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'CREATE DATABASE "{name}"')
        yield {**names, "redis_db": broker.connection_pool.connection_kwargs["db"]}
    finally:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
        broker.flushdb()


def test_celery_postgres_redis_and_mlflow_on_postgres(tmp_path, databases):
    data_dir, home = tmp_path / "data" / "toy", tmp_path / "airflow"
    api_port = free_port()
    env = airflow_env(
        home, api_port, data_dir,
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"postgresql+psycopg2://{PG}/{databases['airflow']}",
        AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:6379/{databases['redis_db']}",
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+postgresql://{PG}/{databases['airflow']}",
    )
    migrate = subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    with services(tmp_path / "logs") as group:
        mlflow_url = mlflow_server(group, data_dir, free_port(), f"postgresql://{PG}/{databases['mlflow']}",
                                   tmp_path / "mlartifacts")
        for name in ("api-server", "scheduler", "dag-processor"):
            group.start(name, ["airflow", name], env)
        for queue in ("default", "gpu"):
            group.start(f"worker-{queue}", ["airflow", "celery", "worker", "--queues", queue, "--concurrency", "1",
                                            "--celery-hostname", f"{queue}@%h"],
                        {**env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        run = trigger_and_wait(f"http://127.0.0.1:{api_port}", home,
                               {**CONF, "data_dir": str(data_dir), "tracking_uri": mlflow_url}, group, 420)
        assert run["tasks"]["train"]["queue"] == "gpu" and run["tasks"]["ingest"]["queue"] == "default"
        # the gpu worker ran train and only train; the default worker ran the rest
        gpu_log = (tmp_path / "logs" / "worker-gpu.log").read_text()
        cpu_log = (tmp_path / "logs" / "worker-default.log").read_text()
        assert "task_id='train'" in gpu_log and "task_id='ingest'" not in gpu_log
        assert "task_id='ingest'" in cpu_log and "task_id='train'" not in cpu_log
        assert champion_and_challenger(mlflow_url) == {"champion": "1", "challenger": "1"}
