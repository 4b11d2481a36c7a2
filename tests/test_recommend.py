"""Batch recommendation from the registry: a tiny trained model as champion in a temp MLflow store."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prepared_data import markov_sequences, write_prepared
from typer.testing import CliRunner

import recblr.base
from kernels import fused_score_topk
from pipeline import tracking
from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.recommend import recommend, top_k
from recblr import models
from recblr.data import Sequences, vocabulary_lut
from recblr.train import TrainConfig, fit

N_ITEMS, MAX_LEN, NAME = 25, 4, "shop-model"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """DATA_DIR with prepared data of 13 users (3..14 events: some inputs shorter than MAX_LEN), a
    1-epoch model trained on it and registered as NAME@champion."""
    data_dir = tmp_path_factory.mktemp("store") / "data" / "shop"
    seqs = [s[: 3 + u] for u, s in enumerate(markov_sequences(13, N_ITEMS, 15))]
    prepared = write_prepared(data_dir / "prepared", seqs, N_ITEMS)
    pq.write_table(pa.table({"user_idx": pa.array(range(len(seqs)), pa.int32()),
                             "user_id": [f"user-{u}" for u in range(len(seqs))]}), prepared / "users.parquet")
    result = fit(prepared, data_dir / "runs" / "recblr", overrides={"d_model": 16, "n_layers": 1},
                 train=TrainConfig(epochs=1, max_len=MAX_LEN, device="cpu", batch_size=8))
    uri = tracking.default_tracking_uri(data_dir)
    tracking.start_training_run(uri, "shop", "2026-01-01", prepared)
    tracking.log_evaluation(result["test"], result["valid"])
    version = tracking.register(result["model_path"], prepared, NAME)
    assert tracking.promote(NAME, version, prepared)["promoted"]
    mlflow.end_run()
    return {"data_dir": data_dir, "uri": uri, "version": version, "model_path": result["model_path"], "seqs": seqs}


def expected_top(registered, k, exclude_history=False):
    """Direct model.scores top-k of each user's last MAX_LEN items: (item ids (U, k), scores (U, k))."""
    model = models.load(registered["model_path"])
    seqs = registered["seqs"]
    out_ids, out_scores = [], []
    with torch.no_grad():
        for seq in seqs:
            scores = model.scores(model(torch.tensor([seq[-MAX_LEN:]]))[0, -1])  # (N + 1,)
            scores[0] = float("-inf")
            if exclude_history:
                scores[seq] = float("-inf")
            top = scores.topk(k)
            out_ids.append([f"i{i}" for i in top.indices.tolist()])
            out_scores.append(top.values.numpy())
    return out_ids, np.array(out_scores)


def test_writes_the_champions_top_k_of_every_user(registered, tmp_path):
    out = tmp_path / "recs" / "top.parquet"
    summary = recommend(registered["data_dir"], model_name=NAME, k=5, out=out, batch_size=5,
                        tracking_uri=registered["uri"], progress=False)
    n_users = len(registered["seqs"])
    assert summary["users"] == n_users and summary["k"] == 5 and summary["rows"] == n_users * 5
    assert summary["model_version"] == registered["version"] and summary["max_len"] == MAX_LEN
    assert summary["output"] == str(out) and summary["users_per_s"] > 0
    assert not list(out.parent.glob("*.tmp"))
    table = pq.read_table(out)
    assert table.schema.names == ["user_id", "rank", "item_id", "score"]
    df = table.to_pandas()
    assert len(df) == n_users * 5 and set(df["user_id"]) == {f"user-{u}" for u in range(n_users)}
    ids, scores = expected_top(registered, 5)
    for u, (user, group) in enumerate(df.groupby("user_id", sort=False)):
        assert user == f"user-{u}"  # users in prepared order, ranks in order
        assert group["rank"].tolist() == [1, 2, 3, 4, 5]
        assert group["score"].is_monotonic_decreasing
        assert group["item_id"].tolist() == ids[u]
        np.testing.assert_allclose(group["score"].to_numpy(), scores[u], rtol=1e-5, atol=1e-6)


def test_exclude_history_drops_every_seen_item(registered, tmp_path):
    out = tmp_path / "unseen.parquet"
    recommend(registered["data_dir"], model_name=NAME, k=3, out=out, exclude_history=True,
              tracking_uri=registered["uri"], progress=False)
    df = pd.read_parquet(out)
    ids, scores = expected_top(registered, 3, exclude_history=True)
    for u, seq in enumerate(registered["seqs"]):
        mine = df[df["user_id"] == f"user-{u}"]
        assert not set(mine["item_id"]) & {f"i{i}" for i in seq}
        assert mine["item_id"].tolist() == ids[u]
        np.testing.assert_allclose(mine["score"].to_numpy(), scores[u], rtol=1e-5, atol=1e-6)


def test_chunks_ranked_by_the_triton_kernel_equal_the_reference_ranking(registered, monkeypatch):
    # CPU tensors take the reference ranking; here the kernel ranks, as on CUDA, through the interpreter
    model = models.load(registered["model_path"])
    lengths = [len(seq) for seq in registered["seqs"]]
    seqs = Sequences(np.concatenate(registered["seqs"]), np.concatenate([[0], np.cumsum(lengths)]))
    want = list(top_k(model, seqs, 5, max_len=MAX_LEN, batch_size=4, progress=False))  # 4 chunks
    monkeypatch.setattr(recblr.base, "score_topk", fused_score_topk)
    got = list(top_k(model, seqs, 5, max_len=MAX_LEN, batch_size=4, progress=False))
    assert len(got) == len(want) == 4
    for (rows, items, scores), (want_rows, want_items, want_scores) in zip(got, want):
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(items, want_items)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_bf16_serves_the_fp32_ranking_within_autocast_rounding(registered, tmp_path):
    ranked = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.parquet"
        summary = recommend(registered["data_dir"], model_name=NAME, k=5, out=out, precision=precision,
                            tracking_uri=registered["uri"], progress=False)
        assert summary["precision"] == precision
        ranked[precision] = pd.read_parquet(out)
    fp32, bf16 = ranked["fp32"], ranked["bf16"]
    assert bf16["score"].dtype == np.float32 and len(bf16) == len(fp32)
    assert not np.array_equal(bf16["score"], fp32["score"])  # the forward did run in bf16
    # bf16 keeps 8 bits of mantissa: scores move by about 1%, so near-ties may swap but the lists agree
    np.testing.assert_allclose(bf16["score"], fp32["score"], rtol=0.05, atol=0.05)
    overlap = [len(set(a) & set(b)) / 5 for (_, a), (_, b) in zip(fp32.groupby("user_id")["item_id"],
                                                                  bf16.groupby("user_id")["item_id"])]
    assert np.mean(overlap) >= 0.8
    with pytest.raises(PipelineError, match="precision must be fp32 or bf16"):
        recommend(registered["data_dir"], model_name=NAME, precision="fp8", tracking_uri=registered["uri"])


def test_cli_json_summary(registered, tmp_path):
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(app, ["recommend", "--data-dir", str(registered["data_dir"]), "--model-name", NAME,
                                      "--k", "2", "--out", str(out), "--tracking-uri", registered["uri"], "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"users", "k", "output", "seconds", "users_per_s", "model_version"} <= set(summary)
    assert summary["k"] == 2 and pq.read_metadata(out).num_rows == 2 * summary["users"]


def test_missing_champion_and_bad_k_are_clear_errors(registered, tmp_path):
    with pytest.raises(PipelineError, match=f"no model version nobody@champion.*registered here: .*{NAME}"):
        recommend(registered["data_dir"], model_name="nobody", tracking_uri=registered["uri"], progress=False)
    with pytest.raises(PipelineError, match="no model version shop-model@gold"):
        recommend(registered["data_dir"], model_name=NAME, alias="gold", tracking_uri=registered["uri"], progress=False)
    out = tmp_path / "never.parquet"
    with pytest.raises(PipelineError, match=r"k must be in 1\.\.25"):
        recommend(registered["data_dir"], model_name=NAME, k=26, out=out, tracking_uri=registered["uri"],
                  progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_mistyped_store_is_refused_not_created(registered):
    typo = Path(registered["uri"].removeprefix("sqlite:///")).with_name("mlfow.db")
    with pytest.raises(PipelineError, match=f"no tracking store at {re.escape(str(typo))}: no such file"):
        recommend(registered["data_dir"], model_name=NAME, tracking_uri=f"sqlite:///{typo}", progress=False)
    assert not typo.exists()


@pytest.mark.parametrize("store", ["http", "sqlite"])
def test_cli_exits_2_with_one_line_naming_an_unusable_store(registered, tmp_path, store):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}" if store == "http" else f"sqlite:///{tmp_path / 'mlfow.db'}"
    done = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "recommend",
                           "--data-dir", str(registered["data_dir"]), "--model-name", NAME, "--tracking-uri", uri],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "500"},
                          timeout=60)  # MLflow's own client retries an unreachable server for minutes
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and uri.removeprefix("sqlite:///") in line
    assert ("Connection refused" if store == "http" else "no such file") in line
    assert not (tmp_path / "mlfow.db").exists()


def test_inputs_move_to_the_models_vocabulary_by_raw_id():
    prepared_ids = np.array([None, "b", "new", "a"], dtype=object)  # dense index -> raw id
    model_ids = np.array([None, "a", "b"], dtype=object)
    seqs = Sequences(np.array([1, 2, 3, 2, 2, 1]), np.array([0, 3, 5, 6]))  # [b new a] [new new] [b]
    moved = seqs.remap(vocabulary_lut(prepared_ids, model_ids))
    assert moved.flat.tolist() == [2, 1, 2] and moved.offsets.tolist() == [0, 2, 2, 3]


def test_reads_the_newest_run_partition_when_there_is_no_prepared_folder(registered, tmp_path):
    import shutil

    data_dir = tmp_path / "nightly"
    for key in ("2026-01-01", "2026-01-02"):  # the later one has only its first 5 users
        shutil.copytree(registered["data_dir"] / "prepared", data_dir / "runs" / key / "prepared")
    newest = data_dir / "runs" / "2026-01-02" / "prepared"
    pq.write_table(pq.read_table(newest / "sequences.parquet").slice(0, 5), newest / "sequences.parquet")
    pq.write_table(pq.read_table(newest / "users.parquet").slice(0, 5), newest / "users.parquet")
    summary = recommend(data_dir, model_name=NAME, k=2, tracking_uri=registered["uri"], progress=False)
    assert summary["prepared"] == str(newest) and summary["users"] == 5 and summary["rows"] == 10
    with pytest.raises(PipelineError, match="no prepared/"):
        recommend(tmp_path / "empty", model_name=NAME, tracking_uri=registered["uri"], progress=False)


def test_data_the_model_does_not_know_and_a_folder_as_out_are_clear_errors(registered, tmp_path):
    import shutil

    known = recommend(registered["data_dir"], model_name=NAME, k=2, out=tmp_path / "known.parquet",
                      tracking_uri=registered["uri"], progress=False)
    assert known["items_unknown_to_model"] == 0 and known["users_without_known_items"] == 0
    with pytest.raises(PipelineError, match="a folder; name the Parquet file"):
        recommend(registered["data_dir"], model_name=NAME, out=tmp_path, tracking_uri=registered["uri"],
                  progress=False)
    other = tmp_path / "other"
    shutil.copytree(registered["data_dir"] / "prepared", other / "prepared")
    items = pq.read_table(other / "prepared" / "items.parquet")
    renamed = pa.array([f"new-{i}" for i in items.column("item_id").to_pylist()])
    pq.write_table(items.set_column(items.schema.get_field_index("item_id"), "item_id", renamed),
                   other / "prepared" / "items.parquet")
    with pytest.raises(PipelineError, match=f"none of .*'s {N_ITEMS} items is in the vocabulary of {NAME}@champion"):
        recommend(other, model_name=NAME, tracking_uri=registered["uri"], progress=False)
