"""RecBLR: shapes, causality, recurrent step = full forward, the paper's init, ablation switches, save/load."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from recblr.model import RecBLR, RecBLRConfig
from recblr.models import build, load, save

N_ITEMS = 40
ABLATIONS = {
    "default": {},
    "one_layer": {"n_layers": 1},
    "no_conv": {"use_conv": False},
    "no_ffn": {"use_ffn": False},
    "random_init": {"lambda_init": "random"},
}


def small(**overrides) -> RecBLR:
    torch.manual_seed(0)
    return build("recblr", N_ITEMS, d_model=16, **overrides).eval()


def items(batch: int = 3, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, N_ITEMS + 1, (batch, length), generator=g)


def test_shapes_and_tied_scores():
    model = small()
    hidden = model(items())
    assert hidden.shape == (3, 7, 16)
    scores = model.scores(hidden)
    assert scores.shape == (3, 7, N_ITEMS + 1)
    torch.testing.assert_close(scores, hidden @ model.item_embedding.weight.T)


@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_causal_and_right_padding_changes_nothing_before(overrides):
    model = small(**overrides)
    x = items()
    changed = x.clone()
    changed[:, 4:] = torch.randint(0, N_ITEMS + 1, changed[:, 4:].shape)  # other items or padding
    torch.testing.assert_close(model(x)[:, :4], model(changed)[:, :4])
    assert not torch.allclose(model(x)[:, 4:], model(changed)[:, 4:])


@pytest.mark.parametrize("overrides", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_step_equals_forward_at_every_position(overrides):
    model = small(**overrides)
    x = items(batch=4, length=11)  # not a power of two
    with torch.no_grad():
        full = model(x)  # (B, T, D)
        state = model.allocate_state(4, "cpu")
        for t in range(x.shape[1]):
            hidden = model.step(x[:, t], state)  # (B, D); the state advances in place
            torch.testing.assert_close(hidden, full[:, t], atol=1e-5, rtol=1e-5)


def test_lambda_init_spans_the_papers_decay_range():
    lam = small().blocks[0].recurrent.lam.detach()
    decay = torch.exp(-F.softplus(lam))
    assert lam.shape == (2 * 16,)
    assert decay.min().item() == pytest.approx(0.9, abs=1e-5)
    assert decay.max().item() == pytest.approx(0.999, abs=1e-5)
    assert torch.all(decay[1:] >= decay[:-1])  # a deterministic sweep, not a draw
    random = torch.exp(-F.softplus(small(lambda_init="random").blocks[0].recurrent.lam.detach()))
    assert random.min().item() < 0.9


def test_init_follows_the_authors():
    model = small()
    assert model.item_embedding.weight[0].abs().max().item() == 0  # padding row
    layer = model.blocks[0].recurrent
    assert layer.gates.bias.abs().max().item() == 0
    assert layer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_ablation_switches_remove_their_parts():
    def names(model):
        return {n for n, _ in model.named_parameters()}

    full = names(small())
    assert not any(".conv." in n for n in names(small(use_conv=False)))
    assert not any(".ffn." in n for n in names(small(use_ffn=False)))
    assert any(".conv." in n for n in full) and any(".ffn." in n for n in full)
    assert len(small(n_layers=1).blocks) == 1


def test_every_parameter_gets_a_gradient_through_the_kernel():
    model = small(dropout=0.5).train()
    x = items()
    loss = F.cross_entropy(model.scores(model(x)[:, -1]), x[:, 0])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.blocks[0].recurrent.lam.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [{"n_items": 0}, {"dropout": 1.0}, {"lambda_init": "uniform"}, {"d_model": 0}],
                         ids=["no_items", "dropout_one", "unknown_init", "zero_width"])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        RecBLRConfig(**{"n_items": N_ITEMS, **bad})


def test_build_rejects_unknown_fields_and_models():
    with pytest.raises(ValueError, match="no config field"):
        build("recblr", N_ITEMS, d_modle=8)
    with pytest.raises(ValueError, match="unknown model"):
        build("bert", N_ITEMS)


def test_save_load_round_trip_with_weights_only(tmp_path):
    model = small(n_layers=1, use_conv=False)
    path = save(model, tmp_path / "m.pt", epoch=3)
    blob = torch.load(path, weights_only=True)
    assert blob["model"] == "recblr" and blob["config"] == dataclasses.asdict(model.config) and blob["epoch"] == 3
    again = load(path)
    assert again.config == model.config
    x = items()
    torch.testing.assert_close(again(x), model(x))


def test_dropout_config_is_what_the_modules_use():
    model = small(dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}
    assert not math.isnan(model(items()).sum().item())
