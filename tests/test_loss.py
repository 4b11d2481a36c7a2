"""The chunked linear + cross-entropy against F.cross_entropy on explicit logits: values, gradients, bf16
autocast, what it keeps for the backward and the largest block it allocates, and its wiring into training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import recblr.loss
import recblr.train
from recblr.data import NO_TARGET, Sequences, training_flat, training_windows
from recblr.loss import linear_cross_entropy
from recblr.models import MODELS, build
from recblr.train import TrainConfig, batch_loss

V, D = 37, 5  # a vocabulary that is not a power of two


def reference(hidden, table, targets, label_smoothing=0.0):
    """The plain path of recblr.train before the chunked loss: every logit at once, float32 or wider."""
    logits = hidden @ table.T  # (n, V)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           label_smoothing=label_smoothing, reduction="sum")


def inputs(n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g, dtype=dtype).requires_grad_()
    table = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    return hidden, table, torch.randint(0, V, (n,), generator=g)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("n, chunk_size", [(10, 1), (10, 3), (10, 7), (10, 10), (10, 64), (1, 4), (10, None)],
                         ids=["n10-c1", "n10-c3", "n10-c7", "n10-c10", "n10-c64", "n1-c4", "n10-default"])
def test_value_and_gradients_equal_cross_entropy_on_the_logits(n, chunk_size, label_smoothing):
    hidden, table, targets = inputs(n)
    want = reference(hidden, table, targets, label_smoothing)
    got = linear_cross_entropy(hidden, table, targets, label_smoothing, chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # an upstream gradient other than 1 (train.py divides by the target count): the backward scales by it
    want_grads = torch.autograd.grad(want * 0.37, (hidden, table))
    got_grads = torch.autograd.grad(got * 0.37, (hidden, table))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("chunk_size", [3, None], ids=["c3", "default"])
def test_rows_without_a_target_count_for_nothing(label_smoothing, chunk_size):
    """NO_TARGET rows (a fixed-shape step's padding) leave the value and every gradient as F.cross_entropy's
    ignore_index does, and get a zero gradient themselves."""
    hidden, table, targets = inputs(10)
    targets[[0, 4, 5, 9]] = NO_TARGET
    want = reference(hidden, table, targets, label_smoothing)  # F.cross_entropy's default ignore_index is -100
    got = linear_cross_entropy(hidden, table, targets, label_smoothing, chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads, want_grads = (torch.autograd.grad(v * 0.37, (hidden, table)) for v in (got, want))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not got_grads[0][targets == NO_TARGET].any()
    all_ignored = torch.full_like(targets, NO_TARGET)
    assert linear_cross_entropy(hidden, table, all_ignored, label_smoothing, chunk_size).item() == 0.0


def test_float32_matches_within_float32_rounding():
    hidden, table, targets = (t.float() if t.is_floating_point() else t for t in inputs(50))
    want, got = reference(hidden, table, targets, 0.1), linear_cross_entropy(hidden, table, targets, 0.1, 16)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (hidden, table)), torch.autograd.grad(want, (hidden, table))):
        torch.testing.assert_close(g, w)


def test_only_the_inputs_that_need_a_gradient_get_one():
    """The popularity model's table is frozen: no table gradient is made, the hidden one is unchanged."""
    hidden, table, targets = inputs(10)
    table.requires_grad_(False)
    linear_cross_entropy(hidden, table, targets, 0.1, 3).backward()
    got = hidden.grad
    hidden.grad = None
    reference(hidden, table, targets, 0.1).backward()
    torch.testing.assert_close(got, hidden.grad)
    assert table.grad is None
    assert saved_numels(lambda: linear_cross_entropy(hidden, table, targets, 0.1, 3)) == [10 * D]  # nor kept


def test_without_grad_the_value_alone():
    hidden, table, targets = inputs(10)
    want = reference(hidden, table, targets, 0.1)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, table, targets, 0.1, 3)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    assert saved_numels(lambda: linear_cross_entropy(hidden.detach(), table.detach(), targets, 0.1, 3)) == []


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["hidden-fp32", "hidden-bf16"])
def test_bf16_autocast_runs_the_matmuls_in_bf16_and_returns_grads_in_the_inputs_dtypes(hidden_dtype):
    hidden, table, targets = inputs(50, torch.float32)
    hidden = (hidden.detach() * 2).to(hidden_dtype).requires_grad_()  # logits of a few units, as trained ones
    fp32 = reference(hidden.float(), table, targets, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(hidden, table, targets, 0.1)
        got = linear_cross_entropy(hidden, table, targets, 0.1, 16)
    assert got.dtype == torch.float32
    # bf16 logits, as the plain path under autocast: far closer to it than to the fp32 loss
    assert (got - want).abs() < (fp32 - want).abs() / 10
    got_grads = torch.autograd.grad(got, (hidden, table))
    want_grads = torch.autograd.grad(want, (hidden, table))
    assert [g.dtype for g in got_grads] == [hidden_dtype, torch.float32]
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02 * w.abs().max().item())


def saved_numels(run) -> list[int]:
    """The element count of every tensor autograd saves for the backward while `run()` builds its graph."""
    numels = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (numels.append(t.numel()), t)[1], lambda t: t):
        run()
    return numels


def test_saves_the_gradients_not_the_logits():
    n, V_, D_ = 60, 1001, 8
    hidden, table = torch.randn(n, D_, requires_grad=True), torch.randn(V_, D_, requires_grad=True)
    targets = torch.randint(0, V_, (n,))
    assert max(saved_numels(lambda: reference(hidden, table, targets))) >= n * V_  # what the check catches
    assert sorted(saved_numels(lambda: linear_cross_entropy(hidden, table, targets, 0.1, 16))) == [n * D_, V_ * D_]


def largest_allocation(run) -> int:
    """Bytes of the largest single CPU allocation while `run()` runs."""
    with profile(profile_memory=True) as prof:
        run()
    return max(e.cpu_memory_usage for e in prof.events())


def test_no_block_larger_than_the_budget_forward_and_backward(monkeypatch):
    n, V_, D_, rows = 60, 1001, 8, 16
    hidden, table = torch.randn(n, D_, requires_grad=True), torch.randn(V_, D_, requires_grad=True)
    targets = torch.randint(0, V_, (n,))
    assert largest_allocation(lambda: reference(hidden, table, targets, 0.1).backward()) >= n * V_ * 4
    monkeypatch.setattr(recblr.loss, "SCORE_BUDGET", rows * V_)  # the default chunk: 16 rows of logits
    assert largest_allocation(lambda: linear_cross_entropy(hidden, table, targets, 0.1).backward()) <= rows * V_ * 4


@pytest.mark.parametrize("change, match", [
    (lambda h, t, y: (h[:, :-1], t, y), "must share D"),
    (lambda h, t, y: (h[None], t, y), "must share D"),
    (lambda h, t, y: (h, t, y[:-1]), "targets must be integers of shape"),
    (lambda h, t, y: (h, t, y.double()), "targets must be integers of shape"),
    (lambda h, t, y: (h, t, torch.where(y == y[0], V, y)), r"targets must be in \[0, 37\)"),
    (lambda h, t, y: (h, t, torch.where(y == y[0], -1, y)), r"targets must be in \[0, 37\)"),
    (lambda h, t, y: (h.float(), t, y), "outside autocast they must match"),
], ids=["hidden-D", "hidden-3d", "targets-length", "targets-float", "target-V", "target-negative", "dtypes"])
def test_bad_inputs_name_the_problem(change, match):
    hidden, table, targets = change(*inputs(10))
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, table, targets)


@pytest.mark.parametrize("kwargs, match", [({"chunk_size": 0}, "chunk_size"), ({"label_smoothing": 1.5},
                                                                                 "label_smoothing")])
def test_bad_settings_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*inputs(10), **kwargs)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_batch_loss_gradients_equal_the_plain_path_for_every_model(model_name, monkeypatch):
    """Training's loss on the tied table gives every parameter the gradient of scores() + F.cross_entropy."""
    history = Sequences(np.array([5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), np.array([0, 1, 3, 9, 12]))
    start, stop = training_windows(history, max_len=4, regime="all")
    torch.manual_seed(0)
    model = build(model_name, 16, **({} if model_name == "pop" else {"d_model": 8}))
    cfg = TrainConfig(device="cpu", label_smoothing=0.1)
    grads = []
    for loss_fn in (linear_cross_entropy, reference):
        monkeypatch.setattr(recblr.train, "linear_cross_entropy", loss_fn)
        torch.manual_seed(1)  # the same dropout masks
        model.zero_grad(set_to_none=True)
        batch_loss(model, training_flat(history, "cpu"), start, stop, cfg).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
