"""DDP under torchrun: ranks' shares of a global batch, and two gloo processes against one on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prepared_data import markov_sequences, write_prepared
from recblr.data import Sequences, training_windows
from recblr.models import build
from recblr.train import TrainConfig, batch_loss, fit, shard

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 24


@pytest.mark.parametrize("regime", ["prefix", "all"])
@pytest.mark.parametrize("size", [9, 2], ids=["full", "smaller-than-world"])
def test_ranks_split_a_batch_disjointly_and_average_to_its_loss(regime, size):
    seqs = markov_sequences(12, N_ITEMS, 9, seed=1)
    flat = np.array([i for s in seqs for i in s], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    start, stop = training_windows(Sequences(flat, offsets), 4, regime)
    batch = np.random.default_rng(0).permutation(len(start))[:size]
    cfg = TrainConfig(regime=regime, device="cpu", label_smoothing=0.1)
    torch.manual_seed(0)
    model = build("recblr", N_ITEMS, d_model=8, dropout=0.0)
    world = 3
    shares = [shard(batch, start, stop, cfg, rank, world) for rank in range(world)]
    real = [mine for mine, n in shares if n != float("inf")]
    assert sorted(np.concatenate(real).tolist()) == sorted(batch.tolist())  # disjoint, and all of the batch
    ranks_mean = sum(batch_loss(model, flat, start[m], stop[m], cfg, n) for m, n in shares) / world
    torch.testing.assert_close(ranks_mean, batch_loss(model, flat, start[batch], stop[batch], cfg))


def test_torchrun_two_processes_match_one_process(tmp_path):
    # 151 users in batches of 50: the last batch has one window, so rank 1 takes the zero-weight path
    write_prepared(tmp_path / "data" / "prepared", markov_sequences(151, N_ITEMS, 10), N_ITEMS)
    args = ["--epochs", "3", "--batch-size", "50", "--max-len", "8", "--lr", "5e-3", "--regime", "all"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pipeline.cli", "train",
           "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "ddp"), "--device", "cpu",
           "--set", "d_model=16", "--set", "dropout=0", *args, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    ddp = lines[0]
    assert Path(ddp["model_path"]).is_file() and ddp["epochs"] == 3

    train = TrainConfig(epochs=3, batch_size=50, max_len=8, lr=5e-3, regime="all", device="cpu")
    one = fit(tmp_path / "data" / "prepared", tmp_path / "one", overrides={"d_model": 16, "dropout": 0.0},
              train=train)
    assert one["valid"]["ndcg_at_10"] > 0.4  # it learned (chance is about 0.2 with 24 items)
    assert ddp["best_epoch"] == one["best_epoch"] and ddp["valid"] == pytest.approx(one["valid"], abs=0.01)
    assert ddp["ndcg_at_10"] == pytest.approx(one["test"]["ndcg_at_10"], abs=0.01)
