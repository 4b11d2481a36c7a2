"""The fused causal conv + SiLU kernels against the float32 reference, outputs and the gradients of x, weight, bias."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import causal_conv_silu, causal_conv_silu_reference, fused_causal_conv_silu
from kernels.causal_conv import fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)


def make_inputs(B, T, C, K, dtype, device="cpu", bias=True, half=False, param_dtype=None, seed=0):
    """x, weight, bias (each needing grad) and a random upstream gradient. half: x is the first half of a
    (B, T, 2C) tensor, as `.chunk` cuts in_proj's output (row stride 2C); param_dtype: weight and bias in
    another dtype than x, as autocast leaves them."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    x = rand(B, T, 2 * C).chunk(2, dim=-1)[0] if half else rand(B, T, C)
    inputs = dict(x=x, weight=rand(C, K, dtype=param_dtype or dtype),
                  bias=rand(C, dtype=param_dtype or dtype) if bias else None)
    return inputs, torch.randn(B, T, C, generator=g).to(device)


def run(fn, inputs, upstream):
    """The output and the gradients of every input that is not None."""
    y = fn(**inputs)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad((y.float() * upstream).sum(), list(leaves.values()))
    return y, dict(zip(leaves, grads))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def assert_close(fn, inputs, upstream, tol):
    y, grads = run(fn, inputs, upstream)
    ref_y, ref_grads = run(causal_conv_silu_reference, inputs, upstream)
    x = inputs["x"]
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert not y.isnan().any(), "y has unwritten elements"
    assert rel_err(y, ref_y) < tol, f"y: {rel_err(y, ref_y):.2e}"
    for name, want in ref_grads.items():
        got = grads[name]
        assert got.dtype == inputs[name].dtype and got.shape == inputs[name].shape
        assert not got.isnan().any(), f"d{name} has unwritten elements"
        assert rel_err(got, want) < tol, f"d{name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("K", [1, 4], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("C", [5, 48], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("T", [1, 3, 37], ids=lambda t: f"T{t}")
def test_fused_matches_reference(T, C, K, dtype):
    # T=1 and 3 are shorter than the window; T=37 spans three forward tiles of 16 rows (the last of 5) and two
    # backward programs of 32 rows (owning 29 and 8)
    inputs, upstream = make_inputs(2, T, C, K, dtype, seed=T * C + K)
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[dtype])


def small_tiles(monkeypatch):
    """Forward 8-row tiles of 16 channels, backward 8 rows of 32: at T=19 three forward tiles (the last of 3
    rows) and four backward programs, each owning 8-(K-1) rows (K=4: 5, 5, 5, 4); C=48 makes three and two
    channel blocks (the last half empty)."""
    monkeypatch.setattr(fused, "TILES", {"fwd": (8, 16, 1), "bwd": (8, 32, 2)})


@pytest.mark.parametrize("K", [3, 4], ids=lambda k: f"K{k}")
def test_fused_many_tiles_and_channel_blocks(K, monkeypatch):
    # the shifted rows, the g a backward program recomputes for its successor and the partial sums all cross
    # program boundaries
    small_tiles(monkeypatch)
    inputs, upstream = make_inputs(2, 19, 48, K, torch.float32, seed=K)
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[torch.float32])


def test_backward_tile_grows_to_cover_the_taps(monkeypatch):
    # 2 rows asked for, K=4 taps: the backward takes 4-row tiles owning one row each, 7 programs a sequence
    monkeypatch.setattr(fused, "TILES", {"fwd": (2, 16, 1), "bwd": (2, 16, 1)})
    assert fused._fit(fused.TILES["bwd"], 7, 20, K=4) == (4, 16, 1)
    inputs, upstream = make_inputs(2, 7, 20, 4, torch.float32, seed=8)
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_half_of_a_wider_projection_is_read_in_place(dtype, monkeypatch):
    small_tiles(monkeypatch)
    inputs, upstream = make_inputs(2, 19, 20, 4, dtype, half=True, bias=False, seed=5)
    x = inputs["x"]
    assert x.stride() == (19 * 40, 40, 1)
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[dtype])
    saved = fused_causal_conv_silu(**inputs).grad_fn.saved_tensors[0]
    assert saved.data_ptr() == x.data_ptr() and saved.stride() == x.stride(), "x was copied"


def test_channels_apart_are_copied_first():
    inputs, upstream = make_inputs(2, 11, 6, 4, torch.float32, seed=6)
    inputs["x"] = inputs["x"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # stride T
    assert inputs["x"].stride(2) == 11
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[torch.float32])


def test_bf16_x_with_float32_weight_as_under_autocast():
    inputs, upstream = make_inputs(2, 37, 48, 4, torch.bfloat16, half=True, param_dtype=torch.float32, seed=7)
    assert_close(fused_causal_conv_silu, inputs, upstream, TOL[torch.bfloat16])


def test_reference_is_the_models_padded_conv():
    # what RecBLR's layer computed before the kernel: Conv1d padded K-1 on both sides, the first T outputs
    B, T, C, K = 2, 9, 6, 4
    conv = nn.Conv1d(C, C, K, groups=C, padding=K - 1)
    x = torch.randn(B, T, C)
    want = F.silu(conv(x.transpose(1, 2))[..., :T].transpose(1, 2))
    with torch.no_grad():
        y = causal_conv_silu_reference(x, conv.weight[:, 0], conv.bias)
        torch.testing.assert_close(y, want)
        # causal: a change at t = 5 moves the outputs from t = 5 on, none before
        x[:, 5] += 1
        moved = (causal_conv_silu_reference(x, conv.weight[:, 0], conv.bias) != y).any(dim=2).any(dim=0)  # (T,)
    assert moved.tolist() == [False] * 5 + [True] * 4


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_tensors_take_the_reference(dtype):
    inputs, upstream = make_inputs(2, 9, 8, 4, dtype, half=True, param_dtype=torch.float32)
    with torch.no_grad():
        y = causal_conv_silu(**inputs)
        want = causal_conv_silu_reference(**inputs).to(dtype)
    assert y.dtype == dtype and torch.equal(y, want)
    assert_close(causal_conv_silu, inputs, upstream, TOL[dtype])


@pytest.mark.parametrize("fn", [causal_conv_silu, fused_causal_conv_silu], ids=["causal_conv_silu", "fused"])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 6)), "x must be \\(B, T, C\\)"),
        (dict(x=torch.zeros(2, 0, 6)), "T >= 1"),
        (dict(weight=torch.zeros(5, 4)), "weight must be \\(6, K\\)"),
        (dict(weight=torch.zeros(6)), "weight must be \\(6, K\\)"),
        (dict(weight=torch.zeros(6, 0)), "K >= 1"),
        (dict(bias=torch.zeros(5)), "bias must be \\(6,\\)"),
        (dict(x=torch.zeros(2, 3, 6, dtype=torch.float16)), "x must be float32 or bfloat16"),
        (dict(weight=torch.zeros(6, 4, dtype=torch.float64)), "weight must be float32 or bfloat16"),
        (dict(bias=torch.zeros(6, device="meta")), "bias is on meta"),
    ],
    ids=["x_2d", "empty_T", "weight_C", "weight_1d", "K_zero", "bias", "fp16", "weight_fp64", "device"],
)
def test_bad_inputs_raise_value_error(fn, change, message):
    inputs = dict(x=torch.zeros(2, 3, 6), weight=torch.zeros(6, 4), bias=torch.zeros(6))
    with pytest.raises(ValueError, match=message):
        fn(**(inputs | change))


def test_fused_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, _ = make_inputs(1, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="fused_causal_conv_silu needs CUDA tensors.*use kernels.causal_conv_silu"):
        fused_causal_conv_silu(**inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("B, T, C", [(256, 200, 128), (8, 1000, 128), (3, 333, 96)])
def test_fused_gpu_real_sizes(B, T, C, dtype):
    for half, bias in ((True, True), (False, False)):
        inputs, upstream = make_inputs(B, T, C, 4, dtype, "cuda", bias=bias, half=half, param_dtype=torch.float32,
                                       seed=B)
        assert_close(causal_conv_silu, inputs, upstream, TOL[dtype])
