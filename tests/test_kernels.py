"""The fused and chunked BD-LRU kernels against the float32 reference, outputs and every gradient."""
import pytest
import torch

from kernels.bdlru import chunk, fused_recurrent, use_chunk
from kernels import bdlru, bdlru_reference, chunk_bdlru, fused_recurrent_bdlru

VARIANTS = {
    "plain": dict(),
    "z": dict(z=True),
    "h0+state": dict(h0=True, return_state=True),
    "z+h0+state": dict(z=True, h0=True, return_state=True),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fused_recurrent, "POISON_OUTPUTS", True)


def make_inputs(B, T, D, dtype, device, z=False, h0=False, return_state=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    inputs = dict(x=rand(B, T, D), r=rand(B, T, D, scale=2.0), i=rand(B, T, D, scale=2.0), lam=rand(D))
    if z:
        inputs["z"] = rand(B, T, D)
    if h0:
        inputs["h0"] = rand(B, D)
    upstream = (torch.randn(B, T, D, generator=g).to(device), torch.randn(B, D, generator=g).to(device))
    return inputs, upstream, return_state


def run(fn, inputs, upstream, return_state):
    """Outputs and gradients of every input, with random upstream gradients for out (and h_T)."""
    res = fn(**inputs, return_state=return_state)
    out, ht = res if return_state else (res, None)
    loss = (out.float() * upstream[0]).sum() + ((ht * upstream[1]).sum() if return_state else 0)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return [out] + ([ht] if return_state else []), dict(zip(inputs, grads))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_close(fn, inputs, upstream, return_state, tol):
    outs, grads = run(fn, inputs, upstream, return_state)
    ref_outs, ref_grads = run(bdlru_reference, inputs, upstream, return_state)
    for got, want in zip(outs, ref_outs):
        assert not got.isnan().any()
        assert rel_err(got, want) < tol
    for name, want in ref_grads.items():
        assert not grads[name].isnan().any(), f"d{name} has unwritten elements"
        assert rel_err(grads[name], want) < tol, f"d{name}: {rel_err(grads[name], want):.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 37])
def test_fused_recurrent_matches_reference_fp32(T, variant):
    inputs, upstream, state = make_inputs(2, T, 12, torch.float32, "cpu", **VARIANTS[variant], seed=T)
    assert_close(fused_recurrent_bdlru, inputs, upstream, state, TOL[torch.float32])


@pytest.mark.parametrize("variant", ["plain", "z+h0+state"])
def test_fused_recurrent_many_tiles_and_channel_blocks(variant, monkeypatch):
    # 4-row tiles, 16- and 8-channel blocks: T=37 spans 10 tiles with a ragged last one, D=20 two blocks
    # forward and three backward
    monkeypatch.setattr(fused_recurrent, "_config", lambda B, T, D, dtype: (4, (16, 1), (8, 1)))
    T = 37
    inputs, upstream, state = make_inputs(2, T, 20, torch.float32, "cpu", **VARIANTS[variant], seed=T)
    assert_close(fused_recurrent_bdlru, inputs, upstream, state, TOL[torch.float32])


@pytest.mark.parametrize("fn", [fused_recurrent_bdlru, chunk_bdlru], ids=["fused_recurrent", "chunk"])
def test_launchers_refuse_cpu_tensors_outside_the_interpreter(fn, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, _, _ = make_inputs(1, 5, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"{fn.__name__} needs CUDA tensors.*use kernels.bdlru"):
        fn(**inputs)


def small_chunks(monkeypatch, rows=(4, 4)):
    """4-row tiles in chunks of `rows` (forward, backward); 16-channel blocks forward, 8 backward (D=20: two
    and three)."""
    monkeypatch.setattr(chunk, "TILES", (4, (16, 1), (8, 1)))
    monkeypatch.setattr(chunk, "CHUNK", rows)


@pytest.mark.parametrize("rows", [(4, 4), (12, 8)], ids=["one_tile", "several_tiles"])
@pytest.mark.parametrize("variant", ["plain", "z+h0+state"])
def test_chunk_matches_reference_fp32(variant, rows, monkeypatch):
    # T=37 makes 10 one-tile chunks, each program waiting on up to 9 published maps; or forward 4 chunks of
    # three tiles whose last holds one row and backward 5 of two
    small_chunks(monkeypatch, rows)
    inputs, upstream, state = make_inputs(2, 37, 20, torch.float32, "cpu", **VARIANTS[variant], seed=3)
    assert_close(chunk_bdlru, inputs, upstream, state, TOL[torch.float32])


@pytest.mark.parametrize("fn", [fused_recurrent_bdlru, chunk_bdlru], ids=["fused_recurrent", "chunk"])
def test_inference_forward_saves_nothing_and_matches(fn, monkeypatch):
    # without autograd the forward stores no checkpoints (serving's path): only the output and state, even
    # for inputs that require grad, whose ctx.needs_input_grad is set under no_grad too
    small_chunks(monkeypatch, rows=(8, 12))
    stored = []
    launch = fused_recurrent.bdlru_fwd
    monkeypatch.setattr(fused_recurrent, "bdlru_fwd", lambda *a, **k: stored.append(a[6]) or launch(*a, **k))
    inputs, _, _ = make_inputs(2, 37, 20, torch.float32, "cpu", **VARIANTS["z+h0+state"], seed=7)
    assert inputs["x"].requires_grad
    with torch.no_grad():
        out, ht = fn(**inputs, return_state=True)
        ref_out, ref_ht = bdlru_reference(**inputs, return_state=True)
    assert rel_err(out, ref_out) < TOL[torch.float32] and rel_err(ht, ref_ht) < TOL[torch.float32]
    fn(**inputs)  # recorded for a backward: the checkpoints are stored
    assert stored == [False, True]


@pytest.mark.parametrize("rows", [(4, 4), (8, 8)], ids=["one_tile", "two_tiles"])
def test_chunk_look_back_across_windows(rows, monkeypatch):
    # with no chunk publishing the state after it, each of the 10 (or 5) chunks composes its predecessors' own
    # maps, 4 per window, down to the first chunk: the path a chunk takes on a GPU while its neighbours run
    small_chunks(monkeypatch, rows)
    monkeypatch.setattr(fused_recurrent, "LOOKBACK_WINDOW", 4)
    monkeypatch.setattr(fused_recurrent, "PUBLISH_STATES", False)
    inputs, upstream, state = make_inputs(2, 37, 20, torch.float32, "cpu", **VARIANTS["z+h0+state"], seed=6)
    assert_close(chunk_bdlru, inputs, upstream, state, TOL[torch.float32])


def make_view_inputs(B, T, D, dtype, device, seed=0):
    """Inputs as the model makes them: r, i halves of one (B, T, 2D) gate projection and z half of the
    input projection (row stride 2D, read in place); x transposed (channel stride T, so copied first)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()

    r, i = leaf(B, T, 2 * D, scale=2.0).chunk(2, dim=-1)
    inputs = dict(x=leaf(B, D, T).transpose(1, 2), r=r, i=i, lam=leaf(D), z=leaf(B, T, 2 * D).chunk(2, dim=-1)[1],
                  h0=leaf(B, D))
    upstream = (torch.randn(B, T, D, generator=g).to(device), torch.randn(B, D, generator=g).to(device))
    return inputs, upstream, True


@pytest.mark.parametrize("fn", [fused_recurrent_bdlru, chunk_bdlru], ids=["fused_recurrent", "chunk"])
def test_inputs_read_in_place_from_views_of_wider_projections(fn, monkeypatch):
    monkeypatch.setattr(fused_recurrent, "_config", lambda B, T, D, dtype: (4, (16, 1), (8, 1)))
    small_chunks(monkeypatch, rows=(8, 12))
    inputs, upstream, state = make_view_inputs(3, 37, 20, torch.float32, "cpu", seed=5)
    assert inputs["r"].stride(1) == 40 and not inputs["x"].is_contiguous()
    assert_close(fn, inputs, upstream, state, TOL[torch.float32])


def test_chunk_matches_reference_bf16_default_config():
    inputs, upstream, state = make_inputs(2, 70, 12, torch.bfloat16, "cpu", **VARIANTS["z+h0+state"], seed=4)
    assert_close(chunk_bdlru, inputs, upstream, state, TOL[torch.bfloat16])


def test_chunk_only_when_the_batch_cannot_fill_the_gpu():
    assert use_chunk(8, 4096, 128, torch.float32, n_sm=132)
    assert not use_chunk(2048, 200, 128, torch.float32, n_sm=132)
    assert not use_chunk(8, 16, 128, torch.float32, n_sm=132)  # too short to cut
    assert use_chunk(256, 4096, 128, torch.float32, n_sm=1000) != use_chunk(256, 4096, 128, torch.float32, n_sm=10)


@pytest.mark.parametrize("variant", ["plain", "z+h0+state"])
def test_fused_recurrent_matches_reference_bf16(variant):
    inputs, upstream, state = make_inputs(2, 37, 12, torch.bfloat16, "cpu", **VARIANTS[variant], seed=1)
    assert_close(fused_recurrent_bdlru, inputs, upstream, state, TOL[torch.bfloat16])


def test_reference_state_is_last_step_and_h0_decays():
    inputs, _, _ = make_inputs(3, 6, 4, torch.float32, "cpu", h0=True)
    out, ht = bdlru_reference(**inputs, return_state=True)
    torch.testing.assert_close(ht, out[:, -1])
    # with x = 0 the state only decays: |h_t| < |h_{t-1}| since 0 < a < 1
    zero_x = dict(inputs, x=torch.zeros_like(inputs["x"]))
    h = bdlru_reference(**zero_x).detach()
    assert (h[:, 1:].abs() < h[:, :-1].abs()).all() and (h[:, 0].abs() < inputs["h0"].detach().abs()).all()


def test_cpu_bdlru_keeps_input_dtype():
    inputs, upstream, state = make_inputs(2, 9, 8, torch.bfloat16, "cpu", z=True, h0=True, return_state=True)
    out, ht = bdlru(**inputs, return_state=True)
    assert out.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert_close(bdlru, inputs, upstream, state, TOL[torch.bfloat16])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lam=torch.zeros(5)), "lam must be"),
        (dict(h0=torch.zeros(2, 5)), "h0 must be"),
        (dict(z=torch.zeros(2, 3, 5)), "z must have"),
        (dict(x=torch.zeros(2, 0, 4), r=torch.zeros(2, 0, 4), i=torch.zeros(2, 0, 4)), "T >= 1"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.float16)), "float32 or bfloat16"),
    ],
    ids=["lam", "h0", "z", "empty_T", "fp16"],
)
def test_bad_inputs_raise_value_error(change, message):
    inputs = dict(x=torch.zeros(2, 3, 4), r=torch.zeros(2, 3, 4), i=torch.zeros(2, 3, 4), lam=torch.zeros(4))
    with pytest.raises(ValueError, match=message):
        bdlru(**(inputs | change))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, T, D", [(64, 200, 128), (4, 1000, 256), (3, 333, 96), (2048, 50, 64)])
@pytest.mark.parametrize("fn", [fused_recurrent_bdlru, chunk_bdlru], ids=["fused_recurrent", "chunk"])
def test_kernels_gpu_real_sizes(fn, B, T, D, dtype):
    for variant in ("plain", "z+h0+state"):
        inputs, upstream, state = make_inputs(B, T, D, dtype, "cuda", **VARIANTS[variant], seed=B)
        assert_close(fn, inputs, upstream, state, TOL[dtype])
    assert_close(fn, *make_view_inputs(B, T, D, dtype, "cuda", seed=B), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [(32, 32), (128, 512), (512, 64)])
def test_chunk_gpu_chunks_of_several_tiles(rows, monkeypatch):
    monkeypatch.setattr(chunk, "CHUNK", rows)
    inputs, upstream, state = make_inputs(4, 1000, 256, torch.float32, "cuda", **VARIANTS["z+h0+state"],
                                          seed=rows[0])
    assert_close(chunk_bdlru, inputs, upstream, state, TOL[torch.float32])
