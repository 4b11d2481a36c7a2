"""StepServer: prefill + steps give the full forward's top-k for every slot; masks, reset and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import recblr.base
from kernels import fused_score_topk
from recblr.models import build
from recblr.serving import StepServer, leaves

N_ITEMS, K = 40, 5
# RecBLR with and without its conv window, and the peers that step (GRU4Rec prefills by stepping, LRURec in parallel)
MODELS = {"recblr": ("recblr", {}), "recblr_no_conv": ("recblr", {"use_conv": False}),
          "gru4rec": ("gru4rec", {}), "lrurec": ("lrurec", {})}
# shorter than RecBLR's conv window, as long, longer; two users share a length; one has no history
LENGTHS = [3, 0, 1, 11, 4, 3, 7]


def small(name: str, device: str = "cpu", **overrides):
    torch.manual_seed(0)
    return build(name, N_ITEMS, d_model=16, **overrides).to(device)  # left in train mode: the server sets eval


def random_items(n: int, seed: int) -> list[int]:
    return torch.randint(1, N_ITEMS + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def forward_top_k(model, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-K after `history` from the full forward, ranked by a sort, padding left out."""
    scores = model.scores(model(torch.tensor([history], device=model.item_embedding.weight.device))[0, -1])
    order = scores[1:].argsort(descending=True)[:K] + 1  # (K,)
    return order, scores[order]


def assert_rows_match_forward(model, top, scores, histories: dict[int, list[int]]):
    for slot, history in histories.items():
        items, values = forward_top_k(model, history)
        assert torch.equal(top[slot], items), f"slot {slot}"
        torch.testing.assert_close(scores[slot], values, atol=1e-5, rtol=0)


def serve_and_check(server: StepServer, model, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill users of LENGTHS into slots (the last one stays empty), step them, check every step against
    the forward; returns each step's output."""
    slots = list(range(len(LENGTHS)))
    histories = {slot: random_items(n, seed=slot) for slot, n in zip(slots, LENGTHS)}
    server.prefill(slots, list(histories.values()))
    outputs = []
    for t in range(steps):
        items = torch.zeros(server.batch_size, dtype=torch.long)
        items[slots] = torch.tensor(random_items(len(slots), seed=100 + t))
        for slot in slots:
            histories[slot].append(items[slot].item())
        top, scores = server.step(items)
        assert_rows_match_forward(model, top, scores, histories)
        outputs.append((top.clone(), scores.clone()))
    return outputs


@pytest.mark.parametrize("name, overrides", MODELS.values(), ids=MODELS.keys())
def test_prefill_then_steps_equal_the_full_forward(name, overrides):
    model = small(name, **overrides)
    server = StepServer(model, batch_size=len(LENGTHS) + 1, k=K)
    assert not model.training and server.graph is None and server.capture_error is None  # CPU: eager
    outputs = serve_and_check(server, model)
    for top, scores in outputs:
        assert (top[:-1] > 0).all() and torch.isfinite(scores[:-1]).all()
        assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


def test_steps_ranked_by_the_triton_kernel_equal_the_full_forward(monkeypatch):
    # CPU tensors take the reference ranking; here the kernel ranks, as on CUDA, through the interpreter
    monkeypatch.setattr(recblr.base, "score_topk", fused_score_topk)
    model = small("recblr")
    serve_and_check(StepServer(model, batch_size=len(LENGTHS) + 1, k=K), model)


def test_top_k_never_returns_padding():
    model = small("recblr")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)
    hidden = base + 0.1 * torch.randn(3, 16, generator=g)  # (3, D)
    with torch.no_grad():
        model.item_embedding.weight[0] = 100 * base  # padding would rank first
        scores = model.scores(hidden)  # (3, N + 1)
    assert (scores[:, 0] > scores[:, 1:].max(dim=1).values).all()
    items, values = model.top_k(hidden, K)
    order = scores[:, 1:].argsort(dim=1, descending=True)[:, :K] + 1  # (3, K)
    assert torch.equal(items, order)
    torch.testing.assert_close(values, scores.gather(1, order))
    server = StepServer(small("recblr"), batch_size=2, k=N_ITEMS)  # every item: all but padding
    server.prefill([0, 1], [[1, 2], [3]])
    top, _ = server.step([4, 5])
    assert torch.equal(top.sort(dim=1).values, torch.arange(1, N_ITEMS + 1).expand(2, -1))


@pytest.mark.parametrize("name", ["recblr", "gru4rec", "lrurec"])
def test_inactive_slots_keep_state_and_top_k(name):
    model = small(name)
    server = StepServer(model, batch_size=4, k=K)
    histories = [random_items(n, seed=n) for n in (5, 2, 8, 1)]
    server.prefill(range(4), histories)
    first = random_items(4, seed=10)
    top, scores = server.step(torch.tensor(first))
    previous = top.clone(), scores.clone()
    state = [leaf.clone() for leaf in leaves(server.state)]

    active = torch.tensor([True, False, True, False])
    second = random_items(4, seed=11)
    top, scores = server.step(torch.tensor(second), active=active)
    moved, kept = active.nonzero()[:, 0], (~active).nonzero()[:, 0]
    for leaf, old, dim in zip(leaves(server.state), state, server.batch_dims):
        assert torch.equal(leaf.index_select(dim, kept), old.index_select(dim, kept))
        assert not torch.equal(leaf.index_select(dim, moved), old.index_select(dim, moved))
    assert torch.equal(top[kept], previous[0][kept]) and torch.equal(scores[kept], previous[1][kept])
    histories = [h + [first[j]] + ([second[j]] if active[j] else []) for j, h in enumerate(histories)]
    assert_rows_match_forward(model, top, scores, {j: histories[j] for j in moved.tolist()})

    third = random_items(4, seed=12)  # all advance: the kept slots continue from their unchanged state
    top, scores = server.step(torch.tensor(third))
    assert_rows_match_forward(model, top, scores, {j: h + [third[j]] for j, h in enumerate(histories)})


def test_prefill_and_reset_touch_only_their_slots():
    model = small("recblr")
    server = StepServer(model, batch_size=3, k=K)
    histories = [random_items(n, seed=n) for n in (6, 4, 9)]
    server.prefill([2, 0, 1], histories)  # slot order differs from history order
    new = random_items(3, seed=20)
    top, scores = server.step(torch.tensor(new))
    assert_rows_match_forward(model, top, scores, {2: histories[0] + [new[2]], 0: histories[1] + [new[0]],
                                                   1: histories[2] + [new[1]]})

    server.reset([1])
    assert (server.top_items[1] == 0).all() and (server.top_scores[1] == float("-inf")).all()
    server.prefill([0], [random_items(3, seed=30)])  # a new user in slot 0; slot 2 untouched
    again = random_items(3, seed=21)
    top, scores = server.step(torch.tensor(again))
    assert_rows_match_forward(model, top, scores, {0: random_items(3, seed=30) + [again[0]], 1: [again[1]],
                                                   2: histories[0] + [new[2], again[2]]})

    server.reset()
    assert all((leaf == 0).all() for leaf in leaves(server.state))
    assert (server.top_items == 0).all() and (server.top_scores == float("-inf")).all()


def test_bad_inputs_raise_value_error():
    for name in ("sasrec", "pop"):
        with pytest.raises(ValueError, match="not a recurrent model"):
            StepServer(build(name, N_ITEMS), batch_size=2)
    model = small("recblr")
    for k in (0, N_ITEMS + 1):
        with pytest.raises(ValueError, match="k must be in"):
            StepServer(model, batch_size=2, k=k)
    with pytest.raises(ValueError, match="batch_size"):
        StepServer(model, batch_size=0)

    server = StepServer(model, batch_size=2, k=K)
    bad_steps = [
        (dict(items=[1, 2, 3]), "items must be"),
        (dict(items=[[1, 2]]), "items must be"),
        (dict(items=[1.0, 2.0]), "items must be"),
        (dict(items=[1, N_ITEMS + 1]), "item ids must be in"),
        (dict(items=[-1, 2]), "item ids must be in"),
        (dict(items=[1, 2], active=[1, 0]), "active must be"),
        (dict(items=[1, 2], active=[True]), "active must be"),
    ]
    for kwargs, message in bad_steps:
        with pytest.raises(ValueError, match=message):
            server.step(**kwargs)
    bad_prefills = [
        (([2], [[1]]), "slots must be in"),
        (([0, 0], [[1], [2]]), "distinct"),
        (([0, 1], [[1]]), "2 slots but 1 histories"),
        (([0], [[1, 0, 2]]), "a history must be"),
        (([0], [[N_ITEMS + 1]]), "a history must be"),
        (([0], [[[1, 2]]]), "a history must be"),
    ]
    for args, message in bad_prefills:
        with pytest.raises(ValueError, match=message):
            server.prefill(*args)
    with pytest.raises(ValueError, match="slots must be in"):
        server.reset([-1])
    model.train()
    with pytest.raises(RuntimeError, match="train mode"):
        server.step([1, 2])


def test_slots_and_items_must_be_integers_everywhere_not_truncated():
    model = small("recblr")
    server = StepServer(model, batch_size=2, k=K)
    server.prefill([1], [random_items(3, seed=1)])
    state = [leaf.clone() for leaf in leaves(server.state)]
    refused = [
        (lambda: server.prefill([0], [[1.7, 2.2]]), r"histories\[0\] must be integers"),
        (lambda: server.prefill([0.0], [[1]]), "slots must be integers"),
        (lambda: server.reset([1.5]), "slots must be integers"),
        (lambda: server.reset(torch.tensor([True, False])), "slots must be integers"),
        (lambda: server.step([1.0, 2.0]), "items must be integers"),
        (lambda: server.step(torch.tensor([True, False])), "items must be integers"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()
    assert all(torch.equal(a, b) for a, b in zip(leaves(server.state), state))  # nothing was half applied
    # any integer dtype, and lists of ints, as before; an empty history is empty whatever torch makes of []
    server.prefill(np.array([0], dtype=np.int32), [torch.tensor([3, 4], dtype=torch.int16)])
    server.prefill([1], [[]])
    server.step(np.array([5, 6]))
    server.reset(torch.tensor([0], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, overrides", MODELS.values(), ids=MODELS.keys())
def test_cuda_graph_equals_eager_and_forward(name, overrides, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 forward, as the step computes it
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = small(name, "cuda", **overrides)
    graphed = StepServer(model, batch_size=len(LENGTHS) + 1, k=K)
    eager = StepServer(model, batch_size=len(LENGTHS) + 1, k=K, cuda_graph=False)
    assert graphed.graph is not None and graphed.capture_error is None and eager.graph is None
    for (top, scores), (top_eager, scores_eager) in zip(serve_and_check(graphed, model), serve_and_check(eager, model)):
        assert torch.equal(top, top_eager)
        torch.testing.assert_close(scores, scores_eager, atol=1e-6, rtol=0)
