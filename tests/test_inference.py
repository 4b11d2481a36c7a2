"""Serving a recurrent model: prefill == stepping every event, and the inference benchmark's own check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recblr.models import build

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = {"full": {}, "no_conv": {"use_conv": False}, "no_ffn_1_layer": {"use_ffn": False, "n_layers": 1}}


@pytest.mark.parametrize("length", [1, 2, 11])  # shorter than the conv window, equal-ish, longer
@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_prefill_equals_stepping_every_event(overrides, length):
    torch.manual_seed(0)
    model = build("recblr", 40, d_model=16, **overrides).eval()
    items = torch.randint(1, 41, (3, length + 1))
    with torch.no_grad():
        stepped = model.allocate_state(3)
        for t in range(length):
            model.step(items[:, t], stepped)
        filled = model.prefill(items[:, :length])
        for (window, h), (window_ref, h_ref) in zip(filled, stepped):
            assert window.shape == window_ref.shape and window.is_contiguous()
            torch.testing.assert_close(window, window_ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-5)
        # and serving goes on from it: the next step equals the full forward at that position
        hidden = model.step(items[:, length], filled)  # (3, D)
        torch.testing.assert_close(hidden, model(items)[:, -1], atol=1e-5, rtol=1e-5)


def test_benchmark_runs_and_checks_step_against_forward(tmp_path):
    out = tmp_path / "inference.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--device", "cpu", "--threads", "1",
                    "--batch", "2", "--lengths", "3,6", "--n-items", "30", "--d-model", "16", "--repeats", "2",
                    "--recommend-users", "20", "--out", str(out)], check=True, cwd=REPO, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO)})  # this checkout's packages, not an installed copy
    result = json.loads(out.read_text())
    assert [(r["batch"], r["length"]) for r in result["rows"]] == [(2, 3), (2, 6)]
    for row in result["rows"]:
        assert row["step_vs_forward_max_abs"] < 1e-5 and row["step_vs_forward_top10_equal"] == 1.0
        for method in ("step", "recblr", "sasrec", "score", "prefill"):
            assert 0 < row[method]["p50_ms"] <= row[method]["p99_ms"]
            assert row[method]["updates_per_s"] == pytest.approx(2 / (row[method]["p50_ms"] / 1e3))
        assert row["sasrec_over_step"] == pytest.approx(row["sasrec"]["p50_ms"] / row["step"]["p50_ms"])
    assert result["recommend"]["users"] == 20 and result["recommend"]["users_per_s"] > 0
