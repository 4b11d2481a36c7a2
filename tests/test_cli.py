"""Checks the `recblr` command line makes itself, before handing over to a step or a server."""
from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError


def test_ui_refuses_a_port_in_use_before_printing_or_serving(tmp_path, monkeypatch):
    monkeypatch.setattr("os.execv", lambda path, argv: pytest.fail("the MLflow server was started"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--data-dir", str(tmp_path / "shop"), "--port", str(port), "--json"])
    assert isinstance(result.exception, PipelineError), result.exception
    assert str(result.exception).startswith(f"port {port} on 127.0.0.1: ")
    assert str(result.exception).endswith("pick another with --port") and result.stdout == ""
