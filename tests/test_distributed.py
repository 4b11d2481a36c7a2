"""DDP under torchrun: ranks' shares of a global batch, and the launcher's two gloo processes against one."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.errors import PipelineError
from pipeline.launch import fit_on_processes, resolve_nproc, train_args
from prepared_data import markov_sequences, ragged, write_prepared
from recblr.data import Sequences, training_flat, training_windows
from recblr.models import build
from recblr.train import (DDP_CAPTURE_AFTER, TrainConfig, batch_loss, epoch_order, optimizer, shard, stepped,
                          training_step)
from steps import steps_over

N_ITEMS = 24


def ragged_markov(n_users: int, longest: int, seed: int = 0) -> Sequences:
    rng = np.random.default_rng(seed)
    return ragged([s[:rng.integers(2, longest + 1)] for s in markov_sequences(n_users, N_ITEMS, longest, seed)])


@pytest.mark.parametrize("regime", ["prefix", "all"])
@pytest.mark.parametrize("size", [9, 2], ids=["full", "smaller-than-world"])
def test_ranks_split_a_batch_disjointly_and_average_to_its_loss(regime, size):
    history = ragged_markov(12, 9, seed=1)
    start, stop = training_windows(history, 4, regime)
    batch = np.random.default_rng(0).permutation(len(start))[:size]
    cfg = TrainConfig(regime=regime, device="cpu", label_smoothing=0.1)
    torch.manual_seed(0)
    model = build("recblr", N_ITEMS, d_model=8, dropout=0.0)
    world = 3
    shares = [shard(start[batch], stop[batch], cfg, rank, world) for rank in range(world)]
    real = [np.stack([a, b], 1) for a, b, n in shares if n != float("inf")]
    windows = np.stack([start[batch], stop[batch]], 1)
    assert sorted(np.concatenate(real).tolist()) == sorted(windows.tolist())  # disjoint, and all of the batch
    flat = training_flat(history, "cpu")
    ranks_mean = sum(batch_loss(model, flat, a, b, cfg, n) for a, b, n in shares) / world
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


def ddp_run(rank: int, world: int, history: Sequences, cfg: TrainConfig, passes: int) -> dict:
    """`passes` passes of this rank's steps over the windows: its losses, its weights after them, its step's type and
    its graphs' count."""
    start, stop = training_windows(history, cfg.max_len, cfg.regime)
    order = epoch_order(stop - start, cfg, 1)
    torch.manual_seed(0)
    model = build("recblr", N_ITEMS, d_model=8, dropout=0.0).to(cfg.device)
    step = training_step(stepped(model, cfg, world), optimizer(model, cfg), training_flat(history, cfg.device), cfg,
                         rank, world)
    losses = steps_over(step, start, stop, cfg, order, passes)
    return {"losses": losses.cpu(), "weights": [p.detach().cpu() for p in model.parameters()],
            "step": type(step).__name__, "graphs": len(getattr(step, "graphs", ()))}


def ddp_steps(rank: int, world: int, store: Path, history: Sequences, cfg: TrainConfig, passes: int):
    """One rank of test_graphed_ddp_steps_train_as_eager_ddp_steps: `ddp_run` with eager, then graphed steps."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    # ddp_run returns before the group is destroyed: NCCL hangs destroying a communicator that live graphs captured
    runs = {graphed: ddp_run(rank, world, history, dataclasses.replace(cfg, device=f"cuda:{rank}",
                                                                        cuda_graph=graphed), passes)
            for graphed in (False, True)}
    torch.save(runs, store.parent / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_graphed_ddp_steps_train_as_eager_ddp_steps(tmp_path, regime):
    """Two ranks replaying CUDA graphs that hold DDP's gradient all-reduce train as two eager DDP ranks, without
    dropout: the same losses, and the same weights on both ranks. Batches of similar length give the ranks shares of
    unequal lengths at several widths; in "all", a batch of one window leaves rank 1 an empty share."""
    history = ragged_markov(199, 20)  # "all": a window a user, 22 batches of 9 and one of 1
    cfg = TrainConfig(regime=regime, max_len=20, batch_size=9, batch_by_length=True, lr=5e-3)
    passes = 3
    mp.spawn(ddp_steps, args=(2, tmp_path / "store", history, cfg, passes), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for runs in ranks:
        assert (runs[False]["step"], runs[True]["step"]) == ("EagerStep", "GraphedStep")
        assert runs[True]["graphs"] >= 2 and len(runs[True]["losses"]) > DDP_CAPTURE_AFTER + 2 * runs[True]["graphs"]
        torch.testing.assert_close(runs[True]["losses"], runs[False]["losses"], rtol=1e-5, atol=1e-6)
        for g, e in zip(runs[True]["weights"], runs[False]["weights"], strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    for a, b in zip(ranks[0][True]["weights"], ranks[1][True]["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the all-reduce ran inside the replays
