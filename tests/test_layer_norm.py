"""The fused LayerNorm kernels against the float32 reference: outputs and the gradients of x, weight and bias."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import fused_layer_norm, layer_norm, layer_norm_reference
from kernels.layer_norm import fused

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (rows, D): one row; rows off the block of 64; D off a power of two; the models' 64 over several blocks
SHAPES = [((1,), 64), ((3, 7), 24), ((130,), 64), ((2, 65), 100)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)


def make_inputs(rows, D, dtype, device="cpu", seed=0):
    """x, weight, bias (each needing grad; weight and bias away from 1 and 0 so neither is left out) and an
    upstream gradient."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, shift=0.0):
        return (shift + torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()

    return dict(x=rand(*rows, D), weight=rand(D, shift=1.0), bias=rand(D)), torch.randn(*rows, D, generator=g)


def assert_grads_close(grads, grads_ref, dtype, n_rows):
    """x's gradient within the dtype's tolerance; weight's and bias's, sums over n_rows rows of terms each as
    close, within it times sqrt(n_rows) (a bfloat16 output makes its upstream gradient bfloat16 too)."""
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        atol = TOL[dtype] * (1.0 if name == "x" else n_rows ** 0.5)
        torch.testing.assert_close(grad.float(), grads_ref[name].float(), atol=atol, rtol=TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


def run(fn, inputs, upstream):
    y = fn(**inputs, eps=1e-12)
    grads = torch.autograd.grad((y.float() * upstream.to(y.device)).sum(), list(inputs.values()))
    return y, dict(zip(inputs, grads))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows, D", SHAPES, ids=[f"{'x'.join(map(str, r))}_D{d}" for r, d in SHAPES])
def test_fused_matches_reference(rows, D, dtype, monkeypatch):
    monkeypatch.setattr(fused, "PROGRAMS_PER_SM", 1)  # a backward program walks several row blocks
    monkeypatch.setattr(fused, "ELEMENTS", 32 * triton.next_power_of_2(D))  # blocks of 32 rows: several
    inputs, upstream = make_inputs(rows, D, dtype, seed=D)
    y, grads = run(fused_layer_norm, inputs, upstream)
    y_ref, grads_ref = run(layer_norm_reference, inputs, upstream)
    assert y.shape == inputs["x"].shape and y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert_grads_close(grads, grads_ref, dtype, inputs["x"].numel() // D)


def test_cpu_tensors_take_torch_layer_norm():
    inputs, _ = make_inputs((4,), 16, torch.float32)
    want = torch.nn.functional.layer_norm(inputs["x"], (16,), inputs["weight"], inputs["bias"], 1e-5)
    assert torch.equal(layer_norm(**inputs, eps=1e-5), want)


@pytest.mark.parametrize(
    "change, message",
    [(dict(weight=torch.ones(5)), r"weight must be \(4,\)"), (dict(bias=torch.ones(4, 1)), r"bias must be \(4,\)"),
     (dict(x=torch.ones(2, 0)), "D >= 1"), (dict(x=torch.ones(2, 4, dtype=torch.float16)), "float32 or bfloat16")],
    ids=["weight", "bias", "empty_rows", "fp16"],
)
def test_bad_inputs_raise_value_error(change, message):
    inputs = dict(x=torch.ones(2, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5)
    for fn in (layer_norm, fused_layer_norm):
        with pytest.raises(ValueError, match=message):
            fn(**(inputs | change))


def test_fused_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, _ = make_inputs((2,), 8, torch.float32)
    with pytest.raises(ValueError, match="fused_layer_norm needs CUDA tensors"):
        fused_layer_norm(**inputs, eps=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fused_gpu_real_sizes(dtype):
    inputs, upstream = make_inputs((512, 1000), 64, dtype, device="cuda", seed=1)
    (y, grads), (y_ref, grads_ref) = run(layer_norm, inputs, upstream), run(layer_norm_reference, inputs, upstream)
    torch.testing.assert_close(y.float(), y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert_grads_close(grads, grads_ref, dtype, 512 * 1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_normalises_in_float32_as_torch_does():
    inputs, _ = make_inputs((64,), 64, torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = inputs["x"].bfloat16()
        got = layer_norm(x, inputs["weight"], inputs["bias"], 1e-5)
        want = torch.nn.functional.layer_norm(x, (64,), inputs["weight"], inputs["bias"], 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_benchmark_runs_and_checks_the_kernel_against_torch(tmp_path):
    out = tmp_path / "layer_norm.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "layer_norm_kernel.py"), "--shapes", "100x24_fp32",
                    "--json", str(out)], check=True, cwd=REPO, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["rows"], row["D"], row["dtype"]) == (100, 24, "fp32") and row["max_diff"] < 1e-4
    assert all(ms > 0 for method in ("fused", "torch", "floor") for ms in row[method])
