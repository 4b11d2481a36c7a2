"""benchmarks/training_cost.py: a CPU run writes its table's JSON and figure; --plot redraws runs together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from training_cost import _ratio, plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(model: str, T: int, precision: str = "fp32", **error) -> dict:
    return {"model": model, "T": T, **error} if error else {
        "model": model, "T": T, "epoch_s": T / 100, "peak_mb": 3.0 * T, "precision": precision,
        "peak_kind": "cuda_max_allocated"}


def run(rows: list[dict], **flags) -> dict:
    data = {"users": 10, "interactions": 100, "items": 5}
    return {"data": data, "args": {"recompute": str(flags.get("recompute", False)), "compile": "False"}, "rows": rows}


def test_plot_draws_a_line_per_model_precision_and_mode_without_failed_rows(tmp_path):
    runs = [run([row("recblr", 50), row("sasrec", 50), row("recblr", 200), row("sasrec", 200, error="out of memory")]),
            run([row("recblr", 200, "bf16"), row("recblr", 50, "bf16")], recompute=True)]
    drawn = plot(runs, tmp_path / "fig.png")
    assert drawn == {"recblr fp32": [50, 200], "sasrec fp32": [50], "recblr bf16 recompute": [50, 200]}
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC


def test_cpu_run_writes_rows_and_figure_and_plot_redraws_them(tmp_path):
    script, env = REPO / "benchmarks" / "training_cost.py", os.environ | {"PYTHONPATH": str(REPO)}
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--models", "recblr,sasrec", "--lengths", "6,12",
                    "--users", "30", "--events-per-user", "20", "--items", "40", "--batch-size", "8", "--warmup", "1",
                    "--epochs", "1", "--data", str(tmp_path / "prepared"), "--json", str(out)],
                   check=True, cwd=REPO, capture_output=True, env=env)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["T"]) for r in rows] == [("recblr", 6), ("sasrec", 6), ("recblr", 12), ("sasrec", 12)]
    assert all(r["epoch_s"] > 0 and r["tokens"] > 0 for r in rows)
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    redrawn = tmp_path / "again.png"
    subprocess.run([sys.executable, str(script), "--plot", str(out), str(out), "--png", str(redrawn)],
                   check=True, cwd=REPO, capture_output=True, env=env)
    assert redrawn.read_bytes()[:8] == PNG_MAGIC


def test_a_ratio_reads_the_right_way_round():
    assert _ratio(0.76, 0.445, "faster", "slower") == "1.71x faster"
    assert _ratio(1.21, 1.95, "faster", "slower") == "1.61x slower"  # printed as "0.62x faster" before
    assert _ratio(5.0, 5.0, "less memory", "more memory") == "1.00x less memory"
