"""Training windows, the loss of both regimes, learning, early stopping, exact resume and the CLI."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from prepared_data import markov_sequences, ragged, write_prepared
from recblr.data import (LENGTH_POOL_BATCHES, gather, load_prepared, padded_batch, similar_length_batches,
                         training_batch, training_flat, training_windows)
from recblr.loss import linear_cross_entropy
from recblr.models import build, load
import recblr.base
import recblr.model
import recblr.train
from recblr.train import (EagerStep, GraphedStep, TrainConfig, batch_loss, epoch_order, fit,
                          graph_widths, optimizer, shard, step_loss, stepped, train_epoch, training_step)
from steps import out_of_memory, steps_over

N_ITEMS = 24
SMALL = {"d_model": 16, "dropout": 0.1}


SEQS = [[5], [1, 2], [3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13]]


def test_prefix_windows_are_every_prefix_truncated_to_max_len():
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=3, regime="prefix")
    got = [(history.flat[a:b].tolist(), int(history.flat[b])) for a, b in zip(start, stop)]
    want = [(s[max(0, t - 3):t], s[t]) for s in SEQS for t in range(1, len(s))]
    assert got == want


def test_all_windows_use_every_target_once():
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=3, regime="all")
    assert (stop - start).max() <= 3
    targets = sorted(int(t) for a, b in zip(start, stop) for t in history.flat[a + 1:b + 1])
    assert targets == sorted(i for s in SEQS for i in s[1:])
    inputs_precede = all(history.flat[a:b].tolist() == [t - 1 for t in history.flat[a + 1:b + 1]]
                         for a, b in zip(start, stop))
    assert inputs_precede  # consecutive ids in SEQS: each input is its target's predecessor


@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_batch_loss_equals_per_sample_cross_entropy(regime):
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=4, regime=regime)
    torch.manual_seed(0)
    model = build("recblr", 16, d_model=8, dropout=0.0)
    cfg = TrainConfig(regime=regime, device="cpu", label_smoothing=0.0)
    losses = []
    for a, b in zip(start, stop):  # each sample alone, unpadded
        inputs = torch.as_tensor(history.flat[a:b])[None]
        targets = torch.as_tensor(history.flat[a + 1:b + 1])
        logits = model.scores(model(inputs))[0]
        losses += [F.cross_entropy(logits[-1:], targets[-1:], reduction="sum")] if regime == "prefix" else \
            [F.cross_entropy(logits, targets, reduction="sum")]
    n = len(start) if regime == "prefix" else int((stop - start).sum())
    want = torch.stack(losses).sum() / n
    torch.testing.assert_close(batch_loss(model, training_flat(history, cfg.device), start, stop, cfg), want)


@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_loss_positions_are_the_unpadded_targets_in_row_order(regime):
    """training_batch's positions pick exactly what masking the padded targets on the device picked,
    in the same order, so the loss and every gradient are bitwise those of the mask."""
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=4, regime=regime)
    torch.manual_seed(0)
    model = build("recblr", 16, d_model=8, dropout=0.0)
    cfg = TrainConfig(regime=regime, device="cpu")
    items, targets = gather(history.flat, start, stop), gather(history.flat, start + 1, stop + 1)
    if regime == "prefix":  # the loss at each window's last position only
        targets = torch.where(torch.arange(targets.shape[1]) == torch.as_tensor(stop - start - 1)[:, None], targets, 0)
    masked = linear_cross_entropy(model(items)[targets != 0], model.item_embedding.weight, targets[targets != 0],
                                  cfg.label_smoothing) / int((targets != 0).sum())
    want = torch.autograd.grad(masked, list(model.parameters()))
    loss = batch_loss(model, training_flat(history, cfg.device), start, stop, cfg)
    assert torch.equal(loss, masked)
    for got, expected in zip(torch.autograd.grad(loss, list(model.parameters())), want, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_fixed_shape_batch_takes_the_same_loss(regime):
    """padded_batch (what a CUDA graph replays: every window padded to max_len, a short batch filled with empty
    rows, spare loss slots with NO_TARGET) gives training_batch's loss and gradients."""
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=4, regime=regime)
    torch.manual_seed(0)
    model = build("recblr", 16, d_model=8, dropout=0.0)
    cfg = TrainConfig(regime=regime, device="cpu", max_len=4)
    flat = training_flat(history, cfg.device)
    first = torch.as_tensor(np.concatenate([start, [0, 0]]))  # two empty rows, as in a short last batch
    length = torch.as_tensor(np.concatenate([stop - start, [0, 0]]))
    slots = int(length.sum()) + 3  # "all" lists its positions in more slots than it has
    fixed = padded_batch(flat, first, length, cfg.max_len, regime, slots)
    assert fixed[0].shape == (len(first), cfg.max_len)
    assert len(fixed[2]) == (slots if regime == "all" else len(first))
    assert torch.bincount(fixed[1]).max() <= 2  # spare slots spread out: the backward's index sum stays parallel
    want = step_loss(model, *training_batch(flat, start, stop, regime), cfg)
    got = step_loss(model, *fixed, cfg)
    torch.testing.assert_close(got, want)
    for g, w in zip(*(torch.autograd.grad(v, list(model.parameters())) for v in (got, want)), strict=True):
        torch.testing.assert_close(g, w)


def test_similar_length_batches_sort_pools_and_shuffle_whole_batches():
    lengths = np.random.default_rng(0).integers(1, 200, size=10 * LENGTH_POOL_BATCHES * 8 + 5)
    order = np.random.default_rng(1).permutation(len(lengths))
    got = similar_length_batches(order, lengths, 8, np.random.default_rng(2))
    assert sorted(got) == list(range(len(lengths)))  # every window once
    batches = [got[lo:lo + 8] for lo in range(0, len(got), 8)]
    assert len(batches[-1]) == 5 and all(len(b) == 8 for b in batches[:-1])  # the short batch stays last
    pools = [order[lo:lo + 8 * LENGTH_POOL_BATCHES] for lo in range(0, len(order), 8 * LENGTH_POOL_BATCHES)]
    pool_of = {int(w): n for n, p in enumerate(pools) for w in p}
    assert all(len({pool_of[int(w)] for w in b}) == 1 for b in batches)  # a batch is cut from one pool
    spread = lambda bs: np.mean([np.ptp(lengths[b]) for b in bs])  # noqa: E731
    random_batches = [order[lo:lo + 8] for lo in range(0, len(order), 8)]
    assert spread(batches) < spread(random_batches) / 10
    assert [pool_of[int(b[0])] for b in batches[:-1]] != sorted(pool_of[int(b[0])] for b in batches[:-1])  # shuffled
    # equal lengths keep the permutation's order, so ties are broken by the seed, not by window index
    ties = similar_length_batches(order, np.ones_like(lengths), 8, np.random.default_rng(2))
    assert sorted(map(tuple, ties[:-5].reshape(-1, 8))) == sorted(map(tuple, order[:-5].reshape(-1, 8)))


def test_epoch_order_is_a_seeded_permutation_that_batch_by_length_rearranges():
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    plain, by_length = TrainConfig(batch_size=16), TrainConfig(batch_size=16, batch_by_length=True)
    assert np.array_equal(epoch_order(lengths, plain, 3), np.random.default_rng([42, 3]).permutation(1000))
    assert np.array_equal(epoch_order(lengths, by_length, 3), epoch_order(lengths, by_length, 3))
    assert not np.array_equal(epoch_order(lengths, by_length, 3), epoch_order(lengths, by_length, 4))
    assert sorted(epoch_order(lengths, by_length, 3)) == list(range(1000))


def test_graph_widths_shrink_by_a_fixed_ratio_from_max_len():
    assert graph_widths(50).tolist() == [7, 9, 13, 18, 25, 36, 50]
    widths = graph_widths(4096)
    assert widths[-1] == 4096 and widths[0] <= recblr.train.MIN_GRAPH_WIDTH < widths[1]
    assert np.all(widths[1:] <= np.ceil(widths[:-1] * recblr.train.GRAPH_WIDTH_RATIO))  # padding at most ratio - 1
    assert graph_widths(4).tolist() == [4] and graph_widths(1).tolist() == [1]


class Recorder(EagerStep):
    """A step that only records what train_epoch hands it."""

    def __init__(self, cfg):
        super().__init__(torch.nn.Linear(1, 1), None, None, cfg)
        self.calls = []

    def __call__(self, start, stop, count=None):
        self.calls.append((int((stop - start).sum()), shard(start, stop, self.cfg, 0, 1, count)[2]))
        return torch.zeros(())


@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_batches_of_similar_length_weigh_every_target_alike(regime):
    """Random batches divide by their own count; batches of similar length (few targets in short ones) divide
    their sum by the epoch's mean count in "all", so each target weighs the same in both orders."""
    history = ragged([list(range(1, n + 2)) for n in np.random.default_rng(0).integers(1, 30, size=200)])
    start, stop = training_windows(history, max_len=30, regime=regime)
    for by_length in (False, True):
        cfg = TrainConfig(device="cpu", regime=regime, batch_size=16, batch_by_length=by_length)
        step = Recorder(cfg)
        train_epoch(step, start, stop, epoch_order(stop - start, cfg, 1), cfg)
        counts, divisors = map(np.array, zip(*step.calls))
        if regime == "prefix":
            assert np.array_equal(divisors, [min(16, len(start) - lo) for lo in range(0, len(start), 16)])
        elif by_length:
            assert np.allclose(divisors, (stop - start).sum() / len(counts)) and np.ptp(counts) > counts.mean()
        else:
            assert np.array_equal(divisors, counts)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("train") / "prepared", markov_sequences(150, N_ITEMS, 10), N_ITEMS)


def quick(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 64, "max_len": 8, "regime": "all", "device": "cpu",
                          "lr": 5e-3, **changes})


@pytest.mark.parametrize("regime", ["prefix", "all"])
def test_fit_learns_and_saves_the_best_model(prepared, tmp_path, regime):
    batch = 256 if regime == "prefix" else 64  # about one user's worth of samples per "all" window
    result = fit(prepared, tmp_path / "run", overrides=SMALL, train=quick(regime=regime, batch_size=batch))
    assert set(result) >= {"model", "config", "train", "epochs", "best_epoch", "valid", "test", "history",
                           "model_path", "seconds"}
    assert result["config"]["d_model"] == 16 and result["train"]["regime"] == regime
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert result["test"]["hr_at_10"] > 0.7  # ~90% of next items follow the rule; chance is 10/24
    best = load(result["model_path"])
    blob = torch.load(result["model_path"], weights_only=True)
    assert blob["epoch"] == result["best_epoch"] and best.config.d_model == 16
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_early_stopping_after_patience_epochs_without_gain(prepared, tmp_path):
    result = fit(prepared, tmp_path / "run", overrides=SMALL, train=quick(epochs=20, lr=0.0, patience=2))
    assert result["epochs"] == 3 and result["best_epoch"] == 1  # with lr 0 nothing ever improves
    assert result["stopped"] == "early stopping"


def test_time_budget_starts_no_epoch_that_would_overrun(prepared, tmp_path):
    ample = fit(prepared, tmp_path / "a", overrides=SMALL, train=quick(epochs=2, time_budget_s=3600))
    assert ample["stopped"] == "epoch cap" and ample["epochs"] == 2
    # the first epoch always runs; after it no second one fits in a millisecond
    cut = fit(prepared, tmp_path / "b", overrides=SMALL, train=quick(epochs=2, time_budget_s=1e-3))
    assert cut["stopped"] == "time budget" and cut["epochs"] == 1
    assert cut["test"] == fit(prepared, tmp_path / "c", overrides=SMALL, train=quick(epochs=1))["test"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("batch_by_length", [False, True])
def test_a_killed_run_resumes_to_the_same_result(prepared, tmp_path, batch_by_length):
    quick_run = lambda: quick(batch_by_length=batch_by_length)  # noqa: E731
    straight = fit(prepared, tmp_path / "a", overrides=SMALL, train=quick_run())

    def kill_after_2(epoch, record):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(prepared, tmp_path / "b", overrides=SMALL, train=quick_run(), on_epoch=kill_after_2)
    seen = []
    resumed = fit(prepared, tmp_path / "b", overrides=SMALL, train=quick_run(), resume=True,
                  on_epoch=lambda epoch, record: seen.append(epoch))
    assert seen == [3]
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]  # noqa: E731
    for got, want in zip(strip(resumed["history"]), strip(straight["history"]), strict=True):
        assert got == pytest.approx(want)
    assert resumed["test"] == pytest.approx(straight["test"])


def test_resume_refuses_other_settings_or_no_checkpoint(prepared, tmp_path):
    with pytest.raises(FileNotFoundError):
        fit(prepared, tmp_path / "none", overrides=SMALL, train=quick(), resume=True)
    fit(prepared, tmp_path / "run", overrides=SMALL, train=quick(epochs=1))
    with pytest.raises(ValueError, match=r"other settings or data; changed: train.lr 0.005 -> 0.01 \(resumable"):
        fit(prepared, tmp_path / "run", overrides=SMALL, train=quick(epochs=2, lr=1e-2), resume=True)
    other_data = write_prepared(tmp_path / "other" / "prepared", markov_sequences(150, N_ITEMS, 10, seed=1), N_ITEMS)
    with pytest.raises(ValueError, match=r"changed: data '[0-9a-f]+' -> '[0-9a-f]+' \(resumable"):
        fit(other_data, tmp_path / "run", overrides=SMALL, train=quick(epochs=2), resume=True)


@pytest.mark.parametrize("field, value", [("regime", "last"), ("epochs", 0), ("batch_size", -5), ("max_len", 0),
                                          ("patience", -1), ("eval_batch_size", 0), ("lr", -1.0),
                                          ("weight_decay", -1.0), ("label_smoothing", 1.0)])
def test_train_config_names_the_setting_out_of_range(field, value):
    with pytest.raises(ValueError, match=field) as err:
        TrainConfig(**{field: value})
    assert "TrainConfig(" not in str(err.value)  # the setting, not all seventeen
    assert dataclasses.replace(TrainConfig(), device="cpu").resolved().epochs == 4


def test_cli_train_then_evaluate(prepared, tmp_path):
    from pipeline.cli import app

    data_dir = prepared.parent
    runner = CliRunner()
    out = runner.invoke(app, ["train", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"),
                              "--epochs", "1", "--batch-size", "64", "--max-len", "8", "--regime", "all",
                              "--device", "cpu", "--set", "d_model=16", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ["hr_at_10", "ndcg_at_10", "mrr_at_10", "hr_at_20", "ndcg_at_20", "mrr_at_20"]
    assert all(0 <= summary[k] <= 1 for k in keys) and summary["epochs"] == 1
    out = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--model-path", summary["model_path"],
                              "--device", "cpu", "--json"])
    assert out.exit_code == 0, out.output
    evaluated = json.loads(out.stdout.strip().splitlines()[-1])
    assert [evaluated[k] for k in keys] == pytest.approx([summary[k] for k in keys])
    out = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--popularity", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout.strip().splitlines()[-1])["hr_at_10"] < evaluated["hr_at_10"]


def test_cli_evaluate_picks_the_model_train_saved_by_name(prepared, tmp_path):
    from pipeline.cli import app
    from pipeline.errors import PipelineError
    from recblr.models import save

    data_dir, runner = tmp_path / "d", CliRunner()
    shutil.copytree(prepared, data_dir / "prepared")
    out = runner.invoke(app, ["train", "--data-dir", str(data_dir), "--model", "gru4rec", "--epochs", "1",
                              "--max-len", "8", "--device", "cpu", "--set", "d_model=16", "--json"])
    assert out.exit_code == 0, out.output
    trained = json.loads(out.stdout.strip().splitlines()[-1])
    default = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--device", "cpu"])
    assert isinstance(default.exception, PipelineError)
    assert str(default.exception) == (f"{data_dir / 'runs' / 'recblr' / 'model.pt'}: no saved model here; pick one "
                                      "with --model NAME (trained here: gru4rec) or --model-path FILE")
    out = runner.invoke(app, ["evaluate", "--data-dir", str(data_dir), "--model", "gru4rec", "--device", "cpu",
                              "--json"])
    assert out.exit_code == 0, out.output
    evaluated = json.loads(out.stdout.strip().splitlines()[-1])
    assert evaluated["model"] == trained["model_path"]
    assert evaluated["ndcg_at_10"] == pytest.approx(trained["ndcg_at_10"])
    # `recblr run`'s data: the partition's own model, which --model names or is refused
    part = tmp_path / "r" / "runs" / "2026-01-01"
    shutil.copytree(prepared, part / "prepared")
    save(build("recblr", N_ITEMS, d_model=8), part / "model" / "model.pt")
    args = ["evaluate", "--data-dir", str(tmp_path / "r"), "--device", "cpu"]
    assert runner.invoke(app, [*args, "--model", "recblr"]).exit_code == 0
    wrong = runner.invoke(app, [*args, "--model", "gru4rec"])
    assert isinstance(wrong.exception, PipelineError)
    assert str(wrong.exception).startswith(f"{part / 'model' / 'model.pt'} holds a recblr model, not --model gru4rec")


@pytest.mark.parametrize("model_name", ["recblr", "gru4rec"])
def test_running_out_of_memory_says_what_needs_less(prepared, tmp_path, model_name, monkeypatch):
    monkeypatch.setattr(recblr.train, "train_epoch", out_of_memory)
    with pytest.raises(recblr.train.OutOfGPUMemory, match=r"during training epoch 1, batches of 64 windows of up to 8"
                       r"; try .*--batch-by-length \(less padding\), or a smaller --batch-size \(now 64\)") as err:
        fit(prepared, tmp_path / "run", model_name, overrides=SMALL, train=quick())
    assert ("--recompute" in str(err.value)) is (model_name == "recblr")  # GRU4Rec has no blocks to recompute
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_running_out_of_memory_in_validation_names_the_eval_batch(prepared, tmp_path, monkeypatch):
    from pipeline.cli import app

    monkeypatch.setattr(recblr.train, "evaluate", out_of_memory)
    out = CliRunner().invoke(app, ["train", "--data-dir", str(prepared.parent), "--run-dir", str(tmp_path / "run"),
                                   "--epochs", "1", "--max-len", "8", "--device", "cpu", "--eval-batch-size", "32"])
    assert "during validation; try a smaller --eval-batch-size (now 32 users a chunk)" in str(out.exception)
    assert type(out.exception).__name__ == "PipelineError"


@pytest.mark.parametrize("in_epoch, said", [
    (2, "interrupted after epoch 1; its checkpoint is {checkpoint}: continue with `recblr train ... --resume`"),
    (1, "interrupted before the first epoch finished, so there is no checkpoint to resume"),
])
def test_ctrl_c_in_train_exits_130_naming_the_checkpoint_to_resume(prepared, tmp_path, monkeypatch, capsys, in_epoch,
                                                                    said):
    from pipeline.cli import app, main

    epochs, train_epoch = [], recblr.train.train_epoch

    def interrupted(*args, **kwargs):
        epochs.append(len(epochs) + 1)
        if epochs[-1] == in_epoch:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(recblr.train, "train_epoch", interrupted)
    run_dir = tmp_path / "run"
    args = ["train", "--data-dir", str(prepared.parent), "--run-dir", str(run_dir), "--epochs", "2", "--max-len", "8",
            "--device", "cpu", "--set", "d_model=16", "--json"]
    monkeypatch.setattr(sys, "argv", ["recblr", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    message = said.format(checkpoint=run_dir / "checkpoint.pt")
    assert exit_info.value.code == 130 and f"error: {message}" in err.splitlines()[-1]
    assert json.loads(out.strip().splitlines()[-1])["error"].startswith(message)
    if in_epoch == 2:  # the advice works: the run goes on from epoch 2
        resumed = CliRunner().invoke(app, [*args, "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert json.loads(resumed.stdout.strip().splitlines()[-1])["epochs"] == 2 and epochs == [1, 2, 3]


def test_cli_names_a_missing_prepared_dir(tmp_path):
    from pipeline.cli import main

    argv = sys.argv
    sys.argv = ["recblr", "train", "--data-dir", str(tmp_path / "nothing"), "--device", "cpu"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2


def test_load_prepared_rejects_out_of_range_items(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", [[1, 2, 3]], 3)
    assert load_prepared(prepared).n_items == 3
    write_prepared(tmp_path / "bad", [[1, 2, 9]], 9)
    shutil.copy(prepared / "items.parquet", tmp_path / "bad" / "items.parquet")  # 3 items, yet 9 is used
    with pytest.raises(ValueError, match="outside 1..3"):
        load_prepared(tmp_path / "bad")


def test_bf16_autocast_feeds_the_scan_bf16_and_learns_like_fp32(prepared, tmp_path, monkeypatch):
    dtypes = set()
    scan = recblr.model.bdlru
    monkeypatch.setattr(recblr.model, "bdlru", lambda x, *a, **k: (dtypes.add(x.dtype), scan(x, *a, **k))[1])
    bf16 = fit(prepared, tmp_path / "bf16", overrides=SMALL, train=quick(precision="bf16"))
    assert dtypes == {torch.bfloat16}
    fp32 = fit(prepared, tmp_path / "fp32", overrides=SMALL, train=quick())
    assert torch.float32 in dtypes and bf16["train"]["precision"] == "bf16"
    assert bf16["history"][-1]["loss"] == pytest.approx(fp32["history"][-1]["loss"], rel=0.02)
    assert bf16["test"] == pytest.approx(fp32["test"], abs=0.03)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recompute"])
@pytest.mark.parametrize("model_name", ["recblr", "sasrec"])
def test_compiled_training_step_equals_eager(model_name, recompute, device, monkeypatch):
    """TrainConfig.compile changes how the step runs, not what it computes: same loss, same gradients
    (on CUDA the compiled graph calls the BD-LRU Triton kernel), with the blocks recomputed too (RecBLR in spans of
    2 here, which compile traces one after another)."""
    if device == "cuda":  # TF32 would round eager and compiled matmuls apart
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(recblr.base, "RECOMPUTE_SPAN", 2)
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=4, regime="all")
    torch.manual_seed(0)
    no_dropout = {"dropout": 0.0, **({"attn_dropout": 0.0} if model_name == "sasrec" else {})}
    model = build(model_name, 16, d_model=8, **no_dropout).to(device)
    losses, grads = [], []
    for compile_ in (False, True):
        cfg = TrainConfig(device=device, compile=compile_, recompute=recompute)
        model.zero_grad()
        loss = batch_loss(stepped(model, cfg), training_flat(history, device), start, stop, cfg)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[1], losses[0])
    for compiled, eager in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def keep_activations(patch: pytest.MonkeyPatch) -> None:
    """Blocks and spans run as they do under recompute, but keep their activations instead of re-running."""
    patch.setattr(recblr.base, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))


def loss_grads_saved(model, cfg: TrainConfig, max_len: int):
    """One batch of SEQS: its loss, the gradients, and how many elements autograd saved for the backward."""
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=max_len, regime="all")
    model.zero_grad()
    torch.manual_seed(1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = batch_loss(stepped(model, cfg), training_flat(history, cfg.device), start, stop, cfg)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], sum(saved)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("model_name", ["recblr", "sasrec", "lrurec"])
def test_recompute_changes_memory_not_results(model_name, device, monkeypatch):
    """TrainConfig.recompute re-runs each block in the backward instead of keeping its activations: the loss
    and every gradient stay the same, dropout included (the recomputed forward draws the same masks). RecBLR and
    LRURec recompute a block in spans of positions (here 4 over windows of 6), compared with the same spans kept."""
    model = build(model_name, 16, d_model=8, dropout=0.3).to(device)
    # the embedding's CUDA backward adds rows with atomics, in no fixed order
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-7}
    cfg = TrainConfig(device=device, recompute=True)
    if model_name != "sasrec":
        monkeypatch.setattr(recblr.base, "RECOMPUTE_SPAN", 4)
        with monkeypatch.context() as patch:
            keep_activations(patch)
            loss_kept, grads_kept, saved_kept = loss_grads_saved(model, cfg, max_len=7)
    else:
        loss_kept, grads_kept, saved_kept = loss_grads_saved(model, dataclasses.replace(cfg, recompute=False), 7)
    loss_re, grads_re, saved_re = loss_grads_saved(model, cfg, max_len=7)
    assert model.recompute and saved_re < saved_kept / 2
    torch.testing.assert_close(loss_re, loss_kept, **exact)
    for recomputed, kept in zip(grads_re, grads_kept, strict=True):
        torch.testing.assert_close(recomputed, kept, **exact)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("model_name, overrides", [("recblr", {}), ("recblr", {"use_conv": False}), ("lrurec", {})],
                         ids=["recblr", "recblr_no_conv", "lrurec"])
def test_recompute_spans_continue_the_recurrence(model_name, overrides, device, monkeypatch):
    """A span starts from the state the span before left (RecBLR: the conv window and the BD-LRU state; LRURec: the
    LRU state), so without dropout the spans compute what the whole block does: spans of 4 over windows of 6 against
    recompute off."""
    monkeypatch.setattr(recblr.base, "RECOMPUTE_SPAN", 4)
    model = build(model_name, 16, d_model=8, dropout=0.0, **overrides).to(device)
    with torch.no_grad():  # weights well away from the init's N(0, 0.02), so that each earlier input moves the loss
        for p in model.parameters():
            p.normal_(std=0.5)
    whole, spans = (loss_grads_saved(model, TrainConfig(device=device, recompute=on), max_len=7)[:2]
                    for on in (False, True))
    torch.testing.assert_close(spans[0], whole[0])
    for in_spans, in_whole in zip(spans[1], whole[1], strict=True):
        torch.testing.assert_close(in_spans, in_whole, atol=1e-6, rtol=1e-5)


def test_recompute_refused_without_blocks():
    with pytest.raises(ValueError, match="recompute needs a model made of blocks"):
        stepped(build("gru4rec", 16), TrainConfig(device="cpu", recompute=True))


def test_weight_decay_shrinks_matrices_only():
    """weight_decay is AdamW's decoupled decay: with zero gradients a step scales every matrix and the item
    table by (1 - lr * wd) and leaves biases, LayerNorm and Lambda as they were; 0 leaves everything."""
    for wd in (0.0, 0.5):
        model = build("recblr", 16, d_model=8)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt = optimizer(model, TrainConfig(lr=0.1, weight_decay=wd))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for name, p in model.named_parameters():
            scale = 1 - 0.1 * wd if p.dim() >= 2 else 1.0
            torch.testing.assert_close(p.detach(), before[name] * scale, msg=name)
    assert any(name.endswith(".lam") for name, _ in model.named_parameters())  # Lambda is among the undecayed


def test_undecayed_optimizer_is_adam():
    """weight_decay 0 (the default) steps exactly as the paper's Adam over the same gradients."""
    torch.manual_seed(0)
    ours, adams = build("recblr", 16, d_model=8), build("recblr", 16, d_model=8)
    adams.load_state_dict(ours.state_dict())
    opts = [optimizer(ours, TrainConfig(lr=0.01)), torch.optim.Adam(adams.parameters(), lr=0.01)]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours.parameters()]
        for model, opt in zip((ours, adams), opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours.parameters(), adams.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("regime", ["prefix", "all"])
@pytest.mark.parametrize("model_name", ["recblr", "sasrec", "gru4rec", "lrurec"])
def test_training_step_never_waits_for_the_gpu(model_name, regime):
    """A step (batch, loss, backward, AdamW) only queues GPU work, so the host makes the next batch while the
    GPU runs this one: any blocking copy, .item() or boolean mask would sync and raise here."""
    history = ragged(SEQS)
    start, stop = training_windows(history, max_len=4, regime=regime)
    cfg = TrainConfig(device="cuda", regime=regime)
    model = build(model_name, 16, d_model=8).cuda()
    opt = optimizer(model, cfg)
    flat = training_flat(history, cfg.device)  # once a run, before the first step
    for mode in ("default", "error"):  # the first step compiles kernels and makes the optimizer's state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            batch_loss(model, flat, start, stop, cfg).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("regime", ["prefix", "all"])
@pytest.mark.parametrize("model_name", ["recblr", "sasrec", "gru4rec", "lrurec"])
@pytest.mark.parametrize("batch_by_length", [False, True])
def test_graphed_steps_equal_eager_steps(model_name, regime, batch_by_length, monkeypatch):
    """Without dropout, steps replayed from CUDA graphs (fixed shapes, short batches filled with empty rows, a graph
    a width) give the eager steps' losses and weights, and a replay never waits for the GPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(recblr.train, "MIN_GRAPH_WIDTH", 1)  # widths 1, 2, 3 and 4
    history = ragged(SEQS * 8)
    start, stop = training_windows(history, max_len=4, regime=regime)
    # the last batch of a pass is short; batches of similar length span the widths 1-4
    cfg = TrainConfig(device="cuda", regime=regime, max_len=4, batch_size=6, batch_by_length=batch_by_length)
    order = epoch_order(stop - start, cfg, 1)
    no_dropout = {"dropout": 0.0, **({"attn_dropout": 0.0} if model_name == "sasrec" else {})}
    torch.manual_seed(0)
    init = build(model_name, 16, d_model=8, **no_dropout).state_dict()
    runs = []
    for kind in (EagerStep, GraphedStep):
        model = build(model_name, 16, d_model=8, **no_dropout).cuda().train()
        model.load_state_dict(init)
        step = kind(model, optimizer(model, cfg), training_flat(history, cfg.device), cfg)
        losses = steps_over(step, start, stop, cfg, order, check_last_pass=kind is GraphedStep)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = runs
    assert len(step.graphs) >= (3 if batch_by_length else 1)  # by the last pass, every width replays its graph
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for g, e in zip(graph_weights, eager_weights, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_are_graphed_only_while_batches_are_small():
    """Past GRAPH_MAX_POSITIONS a batch the GPU sets the pace, so the step stays eager, unless it recomputes (the
    launches of RecBLR's spans); cuda_graph=False always is eager."""
    model = build("recblr", 16, d_model=8).cuda()
    flat = training_flat(ragged(SEQS), "cuda")
    cases = [({"batch_size": 256, "max_len": 50}, GraphedStep), ({"batch_size": 512, "max_len": 1000}, EagerStep),
             ({"batch_size": 512, "max_len": 1000, "recompute": True}, GraphedStep),
             ({"batch_size": 256, "max_len": 50, "cuda_graph": False}, EagerStep)]
    for fields, kind in cases:
        cfg = TrainConfig(device="cuda", **fields)
        assert type(training_step(model, optimizer(model, cfg), flat, cfg)) is kind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eager_steps_recompute_in_longer_spans(monkeypatch):
    """A graphed step recomputes RecBLR in spans of RECOMPUTE_SPAN; an eager one (here under cuda_graph=False), whose
    every launch costs host time, in spans of at least EAGER_SPAN_POSITIONS positions: 6 windows x 4 here."""
    monkeypatch.setattr(recblr.base, "RECOMPUTE_SPAN", 2)
    monkeypatch.setattr(recblr.base, "EAGER_SPAN_POSITIONS", 6 * 4)
    spans = []
    monkeypatch.setattr(recblr.base, "checkpoint", lambda fn, x, *args, **kw: spans.append(x.shape[1]) or fn(x, *args))
    history = ragged(SEQS * 2)
    start, stop = training_windows(history, max_len=7, regime="all")
    assert len(start) == 6 and (stop - start).max() == 6
    for graph, want in ((True, [2, 2, 2]), (False, [4, 2])):
        cfg = TrainConfig(device="cuda", max_len=7, batch_size=6, recompute=True, cuda_graph=graph)
        model = stepped(build("recblr", 16, d_model=8, n_layers=1).cuda(), cfg)
        spans.clear()
        batch_loss(model, training_flat(history, "cuda"), start, stop, cfg).backward()
        assert model.graphed is graph and spans == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_name", ["recblr", "sasrec", "lrurec"])
def test_replayed_recompute_redraws_the_masks_of_its_forward(model_name, monkeypatch):
    """A replayed step that recomputes its blocks (RecBLR, LRURec: in spans of 3 here) draws in the backward the
    dropout masks its forward drew: it trains exactly as the same graphed step keeping its activations."""
    monkeypatch.setattr(recblr.base, "RECOMPUTE_SPAN", 3)
    history = ragged(SEQS * 8)
    start, stop = training_windows(history, max_len=7, regime="all")
    cfg = TrainConfig(device="cuda", max_len=7, batch_size=6, recompute=True)
    runs = []
    for keep in (True, False):
        with monkeypatch.context() as patch:
            if keep:
                keep_activations(patch)
            torch.manual_seed(0)
            model = build(model_name, 16, d_model=8, dropout=0.3).cuda()
            step = training_step(stepped(model, cfg), optimizer(model, cfg), training_flat(history, "cuda"), cfg)
            runs.append(steps_over(step, start, stop, cfg))
            assert isinstance(step, GraphedStep) and step.graphs
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replays_draw_the_dropout_masks_of_eager_steps(monkeypatch):
    """With dropout, a replay draws what the same step run eagerly draws from the same seed: so the eager warm-up
    steps of a resumed run continue an unbroken run's replays exactly."""
    history = ragged(SEQS * 8)
    start, stop = training_windows(history, max_len=4, regime="all")
    cfg = TrainConfig(device="cuda", max_len=4, batch_size=6)
    runs = []
    for capture_after in (1 << 30, recblr.train.CAPTURE_AFTER):  # never captured, then the default
        monkeypatch.setattr(recblr.train, "CAPTURE_AFTER", capture_after)
        torch.manual_seed(0)
        model = build("recblr", 16, d_model=8, dropout=0.3).cuda().train()
        step = GraphedStep(model, optimizer(model, cfg), training_flat(history, cfg.device), cfg)
        torch.manual_seed(1)
        runs.append(steps_over(step, start, stop, cfg))
    assert step.graphs
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


def test_a_diverging_run_keeps_its_best_epoch_or_says_why_it_has_none(prepared, tmp_path, monkeypatch):
    real = recblr.train.train_epoch
    epochs = iter(range(1, 100))

    def nan_from_epoch_2(*args, **kwargs):
        loss = real(*args, **kwargs)
        return float("nan") if next(epochs) >= 2 else loss

    monkeypatch.setattr(recblr.train, "train_epoch", nan_from_epoch_2)
    result = fit(prepared, tmp_path / "a", overrides=SMALL, train=quick(epochs=5))
    assert result["stopped"] == "diverged" and result["best_epoch"] == 1 and result["epochs"] == 1
    assert result["test"]["ndcg_at_10"] > 0

    monkeypatch.setattr(recblr.train, "train_epoch", lambda *args, **kwargs: float("inf"))
    with pytest.raises(recblr.train.TrainingDiverged, match=r"epoch 1: the training loss is inf, no epoch to keep; "
                                                            r"try a lower --lr \(now 0.005\)"):
        fit(prepared, tmp_path / "b", overrides=SMALL, train=quick())
