"""DDP under torchrun: ranks' shares of a global batch, and the launcher's two gloo processes against one."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.launch import fit_on_processes, resolve_nproc, train_args
from prepared_data import markov_sequences, write_prepared
from recblr.data import Sequences, training_flat, training_windows
from recblr.models import build
from recblr.train import TrainConfig, batch_loss, shard

N_ITEMS = 24


@pytest.mark.parametrize("regime", ["prefix", "all"])
@pytest.mark.parametrize("size", [9, 2], ids=["full", "smaller-than-world"])
def test_ranks_split_a_batch_disjointly_and_average_to_its_loss(regime, size):
    seqs = markov_sequences(12, N_ITEMS, 9, seed=1)
    flat = np.array([i for s in seqs for i in s], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    history = Sequences(flat, offsets)
    start, stop = training_windows(history, 4, regime)
    batch = np.random.default_rng(0).permutation(len(start))[:size]
    cfg = TrainConfig(regime=regime, device="cpu", label_smoothing=0.1)
    torch.manual_seed(0)
    model = build("recblr", N_ITEMS, d_model=8, dropout=0.0)
    world = 3
    shares = [shard(batch, start, stop, cfg, rank, world) for rank in range(world)]
    real = [mine for mine, n in shares if n != float("inf")]
    assert sorted(np.concatenate(real).tolist()) == sorted(batch.tolist())  # disjoint, and all of the batch
    flat = training_flat(history, "cpu")
    ranks_mean = sum(batch_loss(model, flat, start[m], stop[m], cfg, n) for m, n in shares) / world
    torch.testing.assert_close(ranks_mean, batch_loss(model, flat, start[batch], stop[batch], cfg))


def test_two_processes_through_the_launcher_match_one_process(tmp_path):
    # 151 users in batches of 50: the last batch has one window, so rank 1 takes the zero-weight path
    write_prepared(tmp_path / "data" / "prepared", markov_sequences(151, N_ITEMS, 10), N_ITEMS)
    train = TrainConfig(epochs=3, batch_size=50, max_len=8, lr=5e-3, regime="all", device="cpu")
    results, epochs_seen = {}, {}
    for nproc in (2, 1):
        epochs_seen[nproc] = []
        results[nproc] = fit_on_processes(nproc, tmp_path / "data", tmp_path / f"nproc{nproc}",
                                          overrides={"d_model": 16, "dropout": 0.0}, train=train,
                                          on_epoch=lambda epoch, record: epochs_seen[nproc].append(epoch))
    ddp, one = results[2], results[1]
    assert Path(ddp["model_path"]).is_file() and ddp["model_path"].startswith(str(tmp_path / "nproc2"))
    assert one["valid"]["ndcg_at_10"] > 0.4  # it learned (chance is about 0.2 with 24 items)
    assert ddp.keys() == one.keys() and epochs_seen == {2: [1, 2, 3], 1: [1, 2, 3]}
    assert (ddp["train"], ddp["config"], ddp["epochs"]) == (one["train"], one["config"], one["epochs"])
    assert ddp["best_epoch"] == one["best_epoch"] and ddp["valid"] == pytest.approx(one["valid"], abs=0.01)
    assert ddp["test"] == pytest.approx(one["test"], abs=0.01)
    assert [r["val_ndcg_at_10"] for r in ddp["history"]] == pytest.approx(
        [r["val_ndcg_at_10"] for r in one["history"]], abs=0.01)


def test_a_failing_rank_raises_a_pipeline_error_with_the_exit_code_and_what_the_ranks_said(tmp_path):
    with pytest.raises(PipelineError, match="exited with code 1") as failed:
        fit_on_processes(2, tmp_path / "empty", tmp_path / "run", train=TrainConfig(device="cpu"))
    said = str(failed.value)
    assert re.search(r"^\[rank\d\]:error: ", said, re.MULTILINE)  # the CLI's error line, from the first rank to fail
    unwrapped = re.sub(r"\n\[rank\d\]:", "", said)  # rich wraps it to its console width, keeping every character
    assert f"{tmp_path / 'empty' / 'prepared' / 'sequences.parquet'}: missing" in unwrapped


def test_every_train_config_field_reaches_recblr_train_as_an_option(tmp_path):
    from typer.main import get_command

    from pipeline.cli import app

    changed = TrainConfig(epochs=7, batch_size=8, lr=0.5, weight_decay=0.1, label_smoothing=0.0, max_len=9,
                          regime="prefix", patience=3, seed=1, device="cpu", eval_batch_size=16, precision="bf16",
                          time_budget_s=60.0, compile=True, recompute=True, cuda_graph=False, batch_by_length=True)
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(TrainConfig))
    args = train_args(tmp_path, tmp_path / "run", "sasrec", {"dropout": 0.5, "norm": "rms"}, changed)
    parsed = get_command(app).commands["train"].make_context("train", args[1:]).params
    assert {f.name: parsed[f.name] for f in dataclasses.fields(TrainConfig)} == dataclasses.asdict(changed)
    assert parsed["set_"] == ["dropout=0.5", 'norm="rms"'] and parsed["model"] == "sasrec" and parsed["as_json"]


@pytest.mark.parametrize("given, count", [(2, 2), ("3", 3), ("auto", max(torch.cuda.device_count(), 1))])
def test_nproc_per_node_is_a_positive_count_or_auto(given, count):
    assert resolve_nproc(given) == count


@pytest.mark.parametrize("given", [0, "0", "-1", "many", None])
def test_nproc_per_node_rejects_anything_else(given):
    with pytest.raises(PipelineError, match="nproc_per_node"):
        resolve_nproc(given)
