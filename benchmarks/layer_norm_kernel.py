"""LayerNorm over narrow rows: the fused kernels against F.layer_norm, and a copy of the same bytes.

    python benchmarks/layer_norm_kernel.py [--shapes 512000x64_fp32,512000x64_bf16]
        [--json benchmarks/out/layer_norm_kernel.json]

For each (rows, D, dtype): x, weight and bias needing grad, forward alone (no grad) and forward + backward
(gradients of all three), `kernels.fused_layer_norm` against `F.layer_norm` (what nn.LayerNorm runs), medians
of `triton.testing.do_bench` (eager). 512,000 x 64 is a training batch of the models' blocks at T = 1000 (512
windows, D = 64). The floor is a device copy of the bytes the op must move: the forward reads x and writes y;
the backward reads x and dy and writes dx. "max diff" is the largest |fused - F.layer_norm| over y and the
gradients, in float32. Without CUDA it runs under TRITON_INTERPRET=1 at tiny --shapes as a smoke test; its
timings mean nothing.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bdlru_kernel import bench, copy_ms, device_label, kernel_device, write_json
from kernels import fused_layer_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS = 1e-12


def torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def fwd_and_bwd(fn, inputs, dy):
    def forward():
        with torch.no_grad():
            fn(**inputs, eps=EPS)

    return bench(forward), bench(lambda: torch.autograd.grad(fn(**inputs, eps=EPS), list(inputs.values()), dy))


def outputs(fn, inputs, dy):
    y = fn(**inputs, eps=EPS)
    return [y, *torch.autograd.grad(y, list(inputs.values()), dy)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="512000x64_fp32,512000x64_bf16", help="comma-separated ROWSxD_dtype")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/layer_norm_kernel.json"))
    args = p.parse_args()
    device = kernel_device(p, "--shapes")
    rows = []
    for shape in tqdm(args.shapes.split(","), desc="shapes", file=sys.stderr):
        size, dt = shape.split("_")
        M, D = (int(v) for v in size.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        rand = lambda *s: torch.randn(*s, device=device, generator=g).to(DTYPES[dt]).requires_grad_()  # noqa: E731
        inputs, dy = dict(x=rand(M, D), weight=rand(D), bias=rand(D)), torch.randn(M, D, device=device).to(DTYPES[dt])
        n = M * D * dy.element_size()
        diff = max((a.float() - b.float()).abs().max().item() for a, b in
                   zip(outputs(fused_layer_norm, inputs, dy), outputs(torch_layer_norm, inputs, dy)))
        row = {"rows": M, "D": D, "dtype": dt, "max_diff": diff, "floor": (copy_ms(2 * n), copy_ms(5 * n)),
               "fused": fwd_and_bwd(fused_layer_norm, inputs, dy), "torch": fwd_and_bwd(torch_layer_norm, inputs, dy)}
        rows.append(row)
    name = device_label(device)
    print(f"\n{name} (fwd / fwd+bwd, ms, median)")
    print(f"{'rows x D dtype':20} {'floor':>15} {'fused':>15} {'F.layer_norm':>15} {'fused/floor':>12} "
          f"{'torch/fused':>12} {'max diff':>9}")
    for r in rows:
        (fl, f, t) = (r[k] for k in ("floor", "fused", "torch"))
        print(f"{r['rows']}x{r['D']} {r['dtype']:6} " + " ".join(f"{a:7.3f}/{b:7.3f}" for a, b in (fl, f, t))
              + f" {f[0] / fl[0]:5.2f}/{f[1] / fl[1]:5.2f} {t[0] / f[0]:5.1f}/{t[1] / f[1]:5.1f}x {r['max_diff']:9.1e}")
    write_json(args.json, device=name, rows=rows)


if __name__ == "__main__":
    main()
