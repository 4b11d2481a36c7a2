"""The fused step of one RecBLR block against the PyTorch reference, and the model's step going through it."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import BlockWeights, block_step, block_step_reference, fused_block_step
from kernels.block_step import fused
from recblr.models import build

REPO = Path(__file__).resolve().parent.parent
DISPATCH = importlib.import_module("kernels.block_step")  # the package: `kernels.block_step` is its function

# (B, D, expand, conv taps or None, PFFN): one user; two user blocks with D off a power of two; expand 1 and a
# one-column window; one tap (an empty window); no conv; neither conv nor PFFN
CASES = [(1, 16, 2, 4, True), (20, 24, 2, 4, True), (5, 16, 1, 2, False), (3, 8, 2, 1, True),
         (3, 12, 2, None, True), (17, 16, 2, None, False)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)


def make_inputs(B, D, expand, taps, ffn, device="cpu", seed=0):
    """u, window, h and weights, every one random (biases and LayerNorm affines too, so none is left out).

    A matrix's entries have scale 1 / sqrt(its inputs), as trained layers keep them, so the gates' pre-activations
    stay near unit scale: at |r| ~ 20 the forget gate is within an ulp of 1, where sqrt(1 - a^2) keeps few correct
    digits and two float32 computations of the step differed by 6e-5 (benchmarks/RESULTS.md, session 9)."""
    g = torch.Generator().manual_seed(seed)
    E = expand * D

    def rand(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    def matrix(rows, cols):
        return rand(rows, cols, scale=cols ** -0.5)

    weights = BlockWeights(
        in_proj=matrix(2 * E, D), conv=None if taps is None else (rand(E, taps), rand(E)),
        gates=(matrix(2 * E, E), rand(2 * E)), lam=rand(E, scale=2.0), out_proj=matrix(D, E),
        ln_1=(1 + rand(D), rand(D)), ffn=(matrix(4 * D, D), rand(4 * D), matrix(D, 4 * D), rand(D)) if ffn else None,
        ln_2=(1 + rand(D), rand(D)) if ffn else None, eps=1e-12)
    window = rand(B, E, 0 if taps is None else taps - 1, scale=1.0)
    return rand(B, D, scale=1.0), window, rand(B, E, scale=1.0), weights


def run(fn, inputs, active=None, rows=None):
    """fn on copies of the state, which it advances in place: (out, window, h)."""
    u, window, h, weights = inputs
    window, h = window.clone(), h.clone()
    return fn(u, window, h, weights, active, rows), window, h


def assert_matches_reference(inputs, active=None, rows=None, atol=1e-5):
    got, want = run(fused_block_step, inputs, active, rows), run(block_step_reference, inputs, active, rows)
    for name, g, w in zip(("out", "window", "h"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B, D, expand, taps, ffn", CASES, ids=[f"B{c[0]}_D{c[1]}_E{c[2]}_k{c[3]}_ffn{c[4]}"
                                                                for c in CASES])
def test_fused_matches_reference(B, D, expand, taps, ffn):
    assert_matches_reference(make_inputs(B, D, expand, taps, ffn, seed=B + D))


@pytest.mark.parametrize("taps", [4, None])
def test_inactive_users_keep_their_state_bit_for_bit(taps):
    u, window, h, weights = inputs = make_inputs(20, 16, 2, taps, True, seed=4)
    active = (torch.arange(40) % 3 != 1)[::2]  # strided, as a column of a mask would be
    out, new_window, new_h = run(fused_block_step, inputs, active)
    assert torch.equal(new_window[~active], window[~active]) and torch.equal(new_h[~active], h[~active])
    assert not torch.equal(new_h[active], h[active])
    assert_matches_reference(inputs, active)


@pytest.mark.parametrize("users", [8, 16, 32])
def test_programs_of_each_size_cover_the_batch_once(users, monkeypatch):
    # the CPU has one "SM", so the default takes one program for these batches: force several, with 8 users a
    # program the products' rows 8..15 are the next program's users, masked, and the last program is partial
    monkeypatch.setattr(fused, "USERS", users)
    u, window, h, weights = make_inputs(37, 16, 2, 4, True, seed=users)
    g = torch.Generator().manual_seed(users)
    active = torch.rand(37, generator=g) < 0.7
    rows = torch.randint(0, 37, (37,), generator=g)
    assert_matches_reference((u, window, h, weights), active, rows)


@pytest.mark.parametrize("gather, normalise", [(True, True), (True, False), (False, True)])
def test_fused_looks_up_and_normalises_its_input(gather, normalise):
    u, window, h, weights = make_inputs(20, 24, 2, 4, True, seed=6)
    g = torch.Generator().manual_seed(7)
    if normalise:  # the model's embedding LayerNorm, folded in
        weights = weights._replace(ln_in=(1 + 0.3 * torch.randn(24, generator=g), 0.3 * torch.randn(24, generator=g)))
    rows = torch.randint(0, 50, (20, 2), generator=g)[:, 1] if gather else None  # a column, as the model passes
    table = torch.randn(50, 24, generator=g) if gather else u
    assert_matches_reference((table, window, h, weights), rows=rows)


def test_stepping_on_from_the_kernels_own_state():
    u, window, h, weights = make_inputs(4, 16, 2, 4, True)
    state, want = (window.clone(), h.clone()), (window.clone(), h.clone())
    for t in range(5):  # the window shifts one column a step: every column's place is checked
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(t))
        out = fused_block_step(x, *state, weights)
        ref = block_step_reference(x, *want, weights)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for s, w in zip(state, want):
            torch.testing.assert_close(s, w, atol=1e-5, rtol=1e-5)


def test_cpu_tensors_and_strided_states_take_the_reference(monkeypatch):
    monkeypatch.setattr(DISPATCH, "fused_block_step", None)  # calling it would raise
    inputs = make_inputs(3, 16, 2, 4, True)
    with torch.no_grad():
        for got, want in zip(run(block_step, inputs), run(block_step_reference, inputs)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    u, window, h, weights = inputs
    strided = torch.zeros(3, 64)[:, ::2]  # a state the kernel cannot write in place
    assert "contiguous" in fused.refusal(u, window, strided, weights)


def test_fused_refuses_what_the_reference_takes():
    u, window, h, weights = make_inputs(2, 128, 2, 4, True)  # gate products of 256 x 256
    assert not fused.fits(weights)
    with pytest.raises(ValueError, match="products up to"):
        fused_block_step(u, window, h, weights)
    u, window, h, weights = make_inputs(2, 16, 2, 4, True)
    assert fused.fits(weights)
    with pytest.raises(ValueError, match="float32"):
        fused_block_step(u.bfloat16(), window, h, weights)
    # a weight, not only the input: block_step asks the same question before it picks the kernel
    assert "float32" in fused.refusal(u, window, h, weights._replace(lam=weights.lam.bfloat16()))
    assert fused.refusal(u, window, h, weights) is None


@pytest.mark.parametrize("fn", [fused_block_step, block_step_reference])
def test_bad_state_raises_value_error(fn):
    u, window, h, weights = make_inputs(2, 16, 2, 4, True)
    with pytest.raises(ValueError, match=r"window must be \(2, 32, 3\)"):
        fn(u, window[:, :, 1:], h, weights)
    with pytest.raises(ValueError, match=r"h must be \(2, 32\)"):
        fn(u, window, h[:1], weights)
    with pytest.raises(ValueError, match=r"active must be a bool \(2,\)"):
        fn(u, window, h, weights, torch.ones(2))


def test_fused_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        fused_block_step(*make_inputs(2, 16, 2, 4, True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B, taps, ffn", [(1, 4, True), (1024, 4, True), (1000, None, False)])
def test_fused_gpu_real_sizes(B, taps, ffn, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference in float32
    assert_matches_reference(make_inputs(B, 64, 2, taps, ffn, device="cuda", seed=B))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_step_on_cuda_is_one_kernel_a_block_and_equals_forward(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls = []
    monkeypatch.setattr(DISPATCH, "fused_block_step",
                        lambda *args: calls.append(1) or fused_block_step(*args))
    torch.manual_seed(0)
    model = build("recblr", 500, d_model=64).cuda().eval()
    items = torch.randint(1, 501, (33, 9), device="cuda")
    with torch.no_grad():
        full = model(items)  # (B, T, D)
        state = model.allocate_state(33, "cuda")
        for t in range(items.shape[1]):
            hidden = model.step(items[:, t], state)
            torch.testing.assert_close(hidden, full[:, t], atol=1e-5, rtol=1e-5)
    assert len(calls) == items.shape[1] * len(model.blocks)


def test_benchmark_runs_and_checks_the_kernel_against_the_reference(tmp_path):
    out = tmp_path / "block_step.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "block_step_kernel.py"), "--batch", "1,20", "--d-model",
                    "16", "--json", str(out)], check=True, cwd=REPO, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [r["B"] for r in rows] == [1, 20]
    for row in rows:
        assert row["max_diff"] < 1e-5
        assert all(ms > 0 for method in ("fused", "reference") for ms in row[method].values())
