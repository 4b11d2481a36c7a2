"""Causal conv + SiLU kernel vs the model's old composition, eager and compiled, and a copy of the same bytes.

    python benchmarks/causal_conv_kernel.py [--sweep] [--skip-compile] [--shapes 2048x200x128_fp32,...]
        [--json benchmarks/out/causal_conv_kernel.json]

Every method computes y = silu(bias + depthwise causal conv of width 4 over x), forward alone (no grad) and
forward + backward (gradients of x, weight, bias), with x the first half of a (B, T, 2C) tensor as RecBLR's
layer cuts in_proj's output, and weight and bias float32 (bf16 rows run the old composition under autocast,
as training did). "old" is the layer before the kernel: transpose to (B, C, T), conv1d padded K-1 on both
sides, the first T outputs, transpose back, SiLU, and the copy the next Linear makes of the strided result;
"compiled" is torch.compile of it. The floor is a device copy of the bytes the op must move: the forward
reads x and writes y; the backward reads dy and x again (dweight needs it) and writes dx.
Without CUDA it runs under TRITON_INTERPRET=1 at tiny --shapes as a smoke test; its timings mean nothing.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bdlru_kernel import bench, copy_ms
from kernels import fused_causal_conv_silu
from kernels.causal_conv import fused
from kernels.device import interpreting

SHAPES = [(2048, 200, 128, "fp32"), (512, 1024, 128, "fp32"), (8, 4096, 128, "fp32"), (2048, 200, 128, "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
K = 4  # RecBLRConfig.d_conv
# (BT, BC, num_warps) tried for each direction alone
SWEEP = [(16, 128, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (16, 64, 2), (32, 64, 4),
         (64, 64, 4), (32, 32, 2)]


def old_composition(x, weight, bias):
    T, C = x.shape[1:]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=K - 1, groups=C)[..., :T]  # (B, C, T)
        return F.silu(y.transpose(1, 2)).contiguous()  # (B, T, C)


def time_method(fn, inputs, dy):
    def forward():
        with torch.no_grad():
            fn(**inputs)

    return bench(forward), bench(lambda: torch.autograd.grad(fn(**inputs), list(inputs.values()), dy))


def make_inputs(B, T, C, dtype, device):
    """x (the half of a wider leaf), weight, bias, each needing grad, and the upstream gradient dy."""
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, dtype=dtype: torch.randn(*s, device=device, generator=g).to(dtype).requires_grad_()  # noqa: E731
    x = rand(B, T, 2 * C).chunk(2, dim=-1)[0]  # (B, T, C), row stride 2C
    inputs = dict(x=x, weight=rand(C, K, dtype=torch.float32), bias=rand(C, dtype=torch.float32))
    return inputs, torch.randn(B, T, C, device=device, generator=g).to(dtype)


def sweep(inputs, dy):
    """Each launcher alone for each (BT, BC, num_warps): {config: (fwd ms, bwd ms)}."""
    x, weight, bias = (t.detach() for t in inputs.values())
    return {config: (bench(lambda: fused.causal_conv_silu_fwd(x, weight, bias, *config)),
                     bench(lambda: fused.causal_conv_silu_bwd(x, weight, bias, dy, *config)))
            for config in SWEEP}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/causal_conv_kernel.json"))
    p.add_argument("--sweep", action="store_true", help="also time each launcher at each tile configuration")
    p.add_argument("--skip-compile", action="store_true",
                   help="leave out the compiled composition (compiles per shape)")
    p.add_argument("--shapes", default=",".join(f"{B}x{T}x{C}_{dt}" for B, T, C, dt in SHAPES),
                   help="comma-separated BxTxC_dtype (default: all four)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not interpreting():
        p.error("no CUDA: set TRITON_INTERPRET=1 to smoke-test on the CPU at tiny --shapes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(int(b), int(t), int(c), dt) for b, t, c, dt in
              (s.replace("_", "x").split("x") for s in args.shapes.split(","))]
    methods = {"fused": fused_causal_conv_silu, "old": old_composition}
    if not args.skip_compile:
        methods["compiled"] = torch.compile(old_composition, dynamic=False)
    rows, sweeps = [], {}
    for B, T, C, dt in tqdm(shapes, desc="shapes", file=sys.stderr):
        inputs, dy = make_inputs(B, T, C, DTYPES[dt], device)
        n = B * T * C * dy.element_size()
        row = {"B": B, "T": T, "C": C, "dtype": dt, "floor": (copy_ms(2 * n), copy_ms(5 * n))}
        for name, fn in methods.items():
            row[name] = time_method(fn, inputs, dy)
        print(f"{B}x{T}x{C}_{dt}: " + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in row.items()
                                                if isinstance(v, tuple)), flush=True)
        shape = f"{B}x{T}x{C}_{dt}"
        if args.sweep:  # printed as it comes: a sweep is the long part of a run
            res = sweeps[shape] = {str(c): ms for c, ms in sweep(inputs, dy).items()}
            for j, step in enumerate(("fwd", "bwd")):
                best = sorted(res.items(), key=lambda kv: kv[1][j])[:4]
                print(f"sweep {shape} {step}: " + ", ".join(f"{c} {ms[j]:.3f}" for c, ms in best), flush=True)
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (not a timing)"
    print(f"\n{name} (fwd / fwd+bwd, ms, median)")
    print(f"{'B,T,C dtype':22} {'floor':>13} {'fused':>13} {'old':>13} {'compiled':>13} {'fused/floor':>11} "
          f"{'old/fused':>11} {'comp/fused':>11}")
    nan = (float("nan"),) * 2
    for row in rows:
        fl, f, old, comp = (row.get(k, nan) for k in ("floor", "fused", "old", "compiled"))
        ratios = [f"{a[0] / b[0]:4.2f}/{a[1] / b[1]:4.2f}x" for a, b in ((f, fl), (old, f), (comp, f))]
        print(f"{row['B']},{row['T']},{row['C']} {row['dtype']:10} "
              + " ".join(f"{v[0]:6.3f}/{v[1]:6.3f}" for v in (fl, f, old, comp)) + " "
              + " ".join(f"{r:>11}" for r in ratios))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": name, "tiles": fused.TILES, "rows": rows, "sweep": sweeps}, indent=1))


if __name__ == "__main__":
    main()
