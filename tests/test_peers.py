"""The Table 1 baselines (SASRec, GRU4Rec, LRURec, popularity) keep the model protocol and train through fit."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from prepared_data import markov_sequences, write_prepared
from recblr.data import load_prepared
from recblr.evaluate import evaluate
from recblr.lrurec import LRURecConfig, LRULayer, lru_scan
from recblr.model import RecBLRConfig
from recblr.models import MODELS, build, load
from recblr.serving import leaves
from recblr.train import TrainConfig, fit
from steps import out_of_memory

N_ITEMS = 40
PEERS = ["sasrec", "gru4rec", "lrurec"]
RECURRENT = ["gru4rec", "lrurec"]
SMALL = {"d_model": 16}  # every peer's width field; keeps CPU tests quick


def small(name: str):
    torch.manual_seed(0)
    return build(name, N_ITEMS, **SMALL).eval()


def random_items(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, N_ITEMS + 1, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PEERS + ["pop"])
def test_protocol_shapes_and_tied_table(name):
    model = small(name) if name != "pop" else build("pop", N_ITEMS).eval()
    items = random_items(3, 7)
    items[1, 4:] = 0  # right padding
    hidden = model(items)
    assert hidden.shape == (3, 7, model.item_embedding.embedding_dim)
    assert model.scores(hidden).shape == (3, 7, N_ITEMS + 1)
    assert model.item_embedding.num_embeddings == N_ITEMS + 1 and model.item_embedding.padding_idx == 0
    assert not model.item_embedding.weight[0].any()
    assert set(dataclasses.asdict(model.config)) >= {"n_items"} and MODELS[name][0] is type(model.config)


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("t", [0, 5, 10])
def test_causal_position_t_ignores_later_items(name, t):
    model = small(name)
    items = random_items(4, 13)
    changed = items.clone()
    changed[:, t + 1:] = random_items(4, 13 - t - 1, seed=1)
    changed[2, t + 1:] = 0  # padding after t is one such change
    before, after = model(items), model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])  # the later positions do read them


@pytest.mark.parametrize("name", RECURRENT)
def test_step_matches_full_forward(name):
    model = small(name)
    items = random_items(3, 11)
    full = model(items)  # (B, T, D)
    state = model.allocate_state(3, "cpu")
    for t in range(items.shape[1]):
        hidden = model.step(items[:, t], state)  # (B, D); the state advances in place
        torch.testing.assert_close(hidden, full[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, batch_dim", [("gru4rec", 1), ("lrurec", 1), ("recblr", 0)])
def test_step_advances_only_the_active_users(name, batch_dim):
    model = small(name)
    items = random_items(4, 3)
    stepped, masked = model.allocate_state(4, "cpu"), model.allocate_state(4, "cpu")
    active = torch.tensor([True, False, True, False])
    with torch.no_grad():
        for t in range(2):
            model.step(items[:, t], stepped)
            model.step(items[:, t], masked)
        before = [leaf.clone() for leaf in leaves(masked)]
        want = model.step(items[:, 2], stepped)
        got = model.step(items[:, 2], masked, active)
    torch.testing.assert_close(got[active], want[active])
    on, off = active.nonzero()[:, 0], (~active).nonzero()[:, 0]
    for old, new, full in zip(before, leaves(masked), leaves(stepped)):
        assert torch.equal(new.index_select(batch_dim, off), old.index_select(batch_dim, off))
        assert not torch.equal(new.index_select(batch_dim, on), old.index_select(batch_dim, on))
        torch.testing.assert_close(new.index_select(batch_dim, on), full.index_select(batch_dim, on))


def sequential_scan(b, lam):
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = lam * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
def test_lru_scan_matches_the_recurrence_with_gradients(length):
    g = torch.Generator().manual_seed(length)
    b = torch.randn(2, length, 5, dtype=torch.complex64, generator=g).requires_grad_()
    lam = torch.polar(torch.rand(5, generator=g) * 0.2 + 0.79, torch.rand(5, generator=g) * 6.28).requires_grad_()
    fast, slow = lru_scan(b, lam), sequential_scan(b, lam)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    weight = torch.randn(fast.shape, dtype=torch.complex64, generator=g)
    # at length 1, lam is unused: its gradient is then zero on both paths
    grads_fast = torch.autograd.grad((fast * weight).real.sum(), (b, lam), allow_unused=True, materialize_grads=True)
    grads_slow = torch.autograd.grad((slow * weight).real.sum(), (b, lam), allow_unused=True, materialize_grads=True)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow):
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-4, rtol=1e-4)


def test_lru_ring_init_and_gamma_normalisation():
    cfg = LRURecConfig(n_items=N_ITEMS, d_model=64, r_min=0.5, r_max=0.7)
    layer = LRULayer(cfg)
    radius = layer.lam().abs()
    assert radius.shape == (cfg.expand * cfg.d_model,)
    assert radius.min() >= 0.5 - 1e-6 and radius.max() <= 0.7 + 1e-6
    torch.testing.assert_close(torch.exp(layer.gamma_log), torch.sqrt(1 - radius ** 2))
    assert layer.lam().angle().abs().max() > 1.0  # rotations, not only decays: the complex part is used


@pytest.mark.parametrize("length", [1, 2, 11])
def test_lrurec_prefill_equals_stepping_every_event(length):
    """One parallel scan gives the states T steps give, and the next step from it equals the full forward."""
    torch.manual_seed(0)
    model = build("lrurec", N_ITEMS, d_model=16).eval()
    items = random_items(3, length + 1)
    with torch.no_grad():
        stepped = model.allocate_state(3)
        for t in range(length):
            model.step(items[:, t], stepped)
        filled = model.prefill(items[:, :length])
        torch.testing.assert_close(filled, stepped, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.step(items[:, length], filled), model(items)[:, -1], atol=1e-5, rtol=1e-5)


def test_sasrec_refuses_sequences_longer_than_its_position_table():
    model = build("sasrec", N_ITEMS, max_len=8)
    with pytest.raises(ValueError, match="max_len 8"):
        model(random_items(2, 9))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Next item mostly = last item + 1: learnable by a sequence model, near-uniform to popularity."""
    return write_prepared(tmp_path_factory.mktemp("toy") / "prepared", markov_sequences(160, N_ITEMS, 10), N_ITEMS)


@pytest.mark.parametrize("name", PEERS)
def test_one_epoch_through_fit_beats_random(name, toy, tmp_path):
    result = fit(toy, tmp_path, name, overrides={"d_model": 32},
                 train=TrainConfig(epochs=1, batch_size=64, lr=1e-2, device="cpu"))
    chance = 10 / N_ITEMS
    assert result["test"]["hr_at_10"] > 2 * chance
    assert load(result["model_path"]).config == build(name, N_ITEMS, d_model=32).config


def test_sasrec_positions_span_the_training_windows_unless_set(toy, tmp_path):
    train = TrainConfig(epochs=1, batch_size=64, max_len=12, device="cpu")
    assert fit(toy, tmp_path / "a", "sasrec", train=train)["config"]["max_len"] == 12
    assert fit(toy, tmp_path / "b", "sasrec", overrides={"max_len": 16}, train=train)["config"]["max_len"] == 16


class RawCounts(torch.nn.Module):
    """Ranks by the raw counts, no log and no temperature: what pop must agree with."""

    def __init__(self, counts: np.ndarray):
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def forward(self, items):
        return torch.zeros(*items.shape, 1)

    def scores(self, hidden):
        return self.counts.expand(*hidden.shape[:-1], -1)


def test_pop_through_fit_ranks_by_training_counts(tmp_path):
    rng = np.random.default_rng(0)
    # Zipf-like item draws: popularity carries signal here, unlike on the Markov toy
    weights = 1.0 / np.arange(1, N_ITEMS + 1)
    sequences = [list(rng.choice(np.arange(1, N_ITEMS + 1), size=8, p=weights / weights.sum())) for _ in range(150)]
    prepared = write_prepared(tmp_path / "prepared", sequences, N_ITEMS)
    result = fit(prepared, tmp_path / "run", "pop", train=TrainConfig(epochs=1, batch_size=64, device="cpu"))
    model, data = load(result["model_path"]), load_prepared(prepared)
    assert model.temperature.item() > 0  # the loop calibrated it without flipping the ranking
    scores = model.scores(model(torch.ones(1, 1, dtype=torch.long)))[0, 0, 1:].detach()
    counts = data.item_counts()[1:]
    assert np.all(np.diff(counts[np.argsort(-scores.numpy(), kind="stable")]) <= 0)
    # the same numbers as ranking by raw counts, and well above chance on skewed data
    assert result["test"] == pytest.approx(evaluate(RawCounts(data.item_counts()), data, "test", progress=False))
    assert result["test"]["hr_at_10"] > 1.5 * 10 / N_ITEMS


def test_compare_writes_table_chart_and_mlflow_parent_with_child_per_model(tmp_path):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from pipeline.cli import app

    data_dir = tmp_path / "toy"
    write_prepared(data_dir / "prepared", markov_sequences(100, N_ITEMS, 8), N_ITEMS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["compare", "--data-dir", str(data_dir), "--models", "gru4rec,pop", "--epochs", "1",
            "--set", "gru4rec.d_model=16", "--tracking-uri", uri, "--json"]
    invoked = CliRunner().invoke(app, args)
    assert invoked.exit_code == 0, invoked.output
    summary = json.loads(invoked.stdout.strip().splitlines()[-1])
    assert [row["model"] for row in summary["rows"]] == ["gru4rec", "pop"]
    out = Path(summary["output"])
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "comparison.md").read_text().strip().splitlines()) == 2 + 2  # header, rule, 2 models

    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_model = {run.info.run_name: run for run in children}
    assert set(by_model) == {"gru4rec", "pop"}
    for row in summary["rows"]:
        child = by_model[row["model"]]
        assert child.data.metrics["test_ndcg_at_10"] == pytest.approx(row["ndcg_at_10"])
        assert parent.data.metrics[f"{row['model']}_test_hr_at_20"] == pytest.approx(row["hr_at_20"])
    assert by_model["gru4rec"].data.params["config.d_model"] == "16"
    assert by_model["gru4rec"].data.tags["recblr.stopped"] == "epoch cap"  # --epochs 1
    assert parent.data.tags["recblr.best_model"] == max(summary["rows"], key=lambda r: r["ndcg_at_10"])["model"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.png", "comparison.md"}


def test_compare_rejects_unknown_models_and_fields_before_training(tmp_path):
    from pipeline.compare import compare

    data_dir = tmp_path / "toy"
    write_prepared(data_dir / "prepared", markov_sequences(20, N_ITEMS, 5), N_ITEMS)
    with pytest.raises(PipelineError, match="'nope'"):
        compare(data_dir, ["sasrec", "nope"], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(PipelineError, match="sasrec has no config field"):
        compare(data_dir, ["sasrec"], overrides={"sasrec": {"n_head": 4}}, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(PipelineError, match=r"compare gru4rec: GRU4RecConfig: dropout must be in \[0, 1\)"):
        compare(data_dir, ["pop", "gru4rec"], dropout=5.0, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(PipelineError, match="no model to compare"):
        compare(data_dir, [], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (data_dir / "compare").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--max-len", "0"], "max_len must be >= 1, got 0"),
    (["--models", "pop,gru4rec,pop"], r"model\(s\) \['pop'\] given more than once"),
])
def test_compare_refuses_bad_settings_before_training(tmp_path, args, message):
    from typer.testing import CliRunner

    from pipeline.cli import app

    data_dir = tmp_path / "toy"
    write_prepared(data_dir / "prepared", markov_sequences(20, N_ITEMS, 5), N_ITEMS)
    invoked = CliRunner().invoke(app, ["compare", "--data-dir", str(data_dir), "--models", "pop",
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *args])
    assert isinstance(invoked.exception, PipelineError), invoked.exception
    assert re.search(message, str(invoked.exception))
    assert not (data_dir / "compare").exists() and not (tmp_path / "m.db").exists()


def test_compare_trains_on_a_recblr_run_partition_and_names_data_it_cannot_train_on(tmp_path):
    from pipeline.compare import compare

    data_dir, uri = tmp_path / "toy", f"sqlite:///{tmp_path / 'm.db'}"
    write_prepared(data_dir / "runs" / "2026-01-01" / "prepared", markov_sequences(20, N_ITEMS, 5), N_ITEMS)
    summary = compare(data_dir, ["pop"], epochs=1, tracking_uri=uri)
    assert [row["model"] for row in summary["rows"]] == ["pop"]
    # two events a user: a validation and a test item, no training pair
    write_prepared(data_dir / "runs" / "2026-01-02" / "prepared", markov_sequences(20, N_ITEMS, 2), N_ITEMS)
    with pytest.raises(PipelineError, match="compare pop: .*2026-01-02.*nothing to learn from"):
        compare(data_dir, ["pop"], epochs=1, tracking_uri=uri)


@pytest.mark.parametrize("field, value, message", [
    ("use_conv", "False", "recblr.use_conv must be true or false, got 'False'"),
    ("n_layers", True, "recblr.n_layers must be an int, got True"),
    ("n_layers", 1.5, "recblr.n_layers must be an int, got 1.5"),
    ("dropout", "abc", "recblr.dropout must be a float, got 'abc'"),
    ("lambda_init", 1, "recblr.lambda_init must be a str, got 1"),
])
def test_config_overrides_of_the_wrong_type_are_refused(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build("recblr", N_ITEMS, **{field: value})
    built = build("recblr", N_ITEMS, dropout=0, use_conv=False).config  # an int is a float
    assert built == RecBLRConfig(N_ITEMS, dropout=0.0, use_conv=False) and isinstance(built.dropout, float)


def test_compare_names_the_model_that_ran_out_of_memory(tmp_path, monkeypatch):
    import recblr.train
    from mlflow import MlflowClient

    from pipeline.compare import compare

    data_dir = tmp_path / "toy"
    write_prepared(data_dir / "prepared", markov_sequences(20, N_ITEMS, 5), N_ITEMS)
    monkeypatch.setattr(recblr.train, "train_epoch", out_of_memory)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(PipelineError, match=r"compare gru4rec: \w+ ran out of memory during training epoch 1"):
        compare(data_dir, ["gru4rec"], epochs=1, tracking_uri=uri)
    runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert runs and {run.info.status for run in runs} == {"FAILED"}  # the parent and the model's child


@pytest.mark.parametrize("bad", ["n_layers=3", "sasrec.n_layers", ".n_layers=3"], ids=["no-model", "no-value", "empty-model"])
def test_compare_set_needs_model_dot_field(tmp_path, bad):
    from typer.testing import CliRunner

    from pipeline.cli import app

    invoked = CliRunner().invoke(app, ["compare", "--data-dir", str(tmp_path), "--set", bad])
    assert isinstance(invoked.exception, PipelineError)
    assert "expected MODEL.FIELD=VALUE" in str(invoked.exception)


def test_devices_and_files_that_are_not_models_are_named_in_the_error(tmp_path):
    from recblr.models import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=r"device 'cuda:99': \d+ CUDA GPU\(s\) visible here"):
        resolve_device("cuda:99")
    text = tmp_path / "events.csv"
    text.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ValueError, match=f"{text}: not a model saved by recblr"):
        load(text)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a model saved by recblr \\(model None"):
        load(tmp_path / "other.pt")
