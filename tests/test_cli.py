"""Checks the `recblr` command line makes itself, before handing over to a step or a server."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

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


def test_an_error_prints_as_one_literal_line_and_a_step_warning_is_labelled(tmp_path, monkeypatch, capsys):
    import logging

    from pipeline import cli

    def prepare(data_dir, min_count):
        logging.getLogger("pipeline.prepare").warning("few users")
        raise PipelineError(f"{data_dir}/events.parquet: a [bold]bracketed[/bold] name, " + "long " * 40)

    monkeypatch.setattr("pipeline.prepare.prepare", prepare)
    monkeypatch.setattr("sys.argv", ["recblr", "prepare", "--data-dir", "shop[1]", "--json"])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own capture handler would take the record
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0] == "WARNING: few users"
    assert lines[1:] == ["error: shop[1]/events.parquet: a [bold]bracketed[/bold] name, " + ("long " * 40).rstrip()]
    assert out.strip().endswith('"}') and "shop[1]/events.parquet" in out


@pytest.mark.parametrize("options, named", [
    (["--model", "sasrec"], "drop --model or --popularity"),
    (["--model-path", "m.pt"], "drop --model-path or --popularity"),
    (["--model", "sasrec", "--model-path", "m.pt"], "drop --model and --model-path or --popularity"),
])
def test_evaluate_refuses_a_saved_model_beside_popularity(tmp_path, options, named):
    result = CliRunner().invoke(app, ["evaluate", "--data-dir", str(tmp_path / "none"), "--popularity", *options])
    assert isinstance(result.exception, PipelineError), result.output
    assert str(result.exception).endswith(named)  # not that DATA_DIR has no prepared data: nothing was read


def recblr(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *argv], capture_output=True,
                          text=True, timeout=120)


def test_a_value_typer_refuses_is_its_usage_error_and_under_json_an_error_line_too():
    for argv, message in ((["prepare", "--min-count", "2"], "Invalid value for '--min-count': "),
                          (["recommend", "--k", "abc"], "Invalid value for '--k': ")):
        plain, as_json = recblr(*argv), recblr(*argv, "--json")
        assert plain.returncode == as_json.returncode == 2
        assert plain.stdout == "" and plain.stderr.startswith("Usage: ") and "Invalid value" in plain.stderr
        assert as_json.stderr == plain.stderr  # typer's own message, as without --json
        assert json.loads(as_json.stdout.splitlines()[-1])["error"].startswith(message)
    helped = recblr("prepare", "--help", "--json")  # an exit that is no error stays as typer makes it
    assert helped.returncode == 0 and helped.stderr == "" and "--min-count" in helped.stdout
    assert not helped.stdout.rstrip().endswith("}")
