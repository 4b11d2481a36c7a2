"""Score + top-k: the fused kernel against a matmul and torch.topk, at serving's batch sizes and catalogues.

    python benchmarks/score_topk_kernel.py [--shapes 1x3416,1024x3416,1x100000,1024x100000] [--d-model 64]
        [--k 10] [--sweep] [--json benchmarks/out/score_topk_kernel.json]

For each B x N: hidden (B, D) and an item table (N + 1, D) whose padding row is cut off as models do (a view),
float32, TF32 off. `kernels.fused_score_topk` against `kernels.score_topk_reference` (the (B, N) scores, then
torch.topk), medians of `triton.testing.do_bench` (eager) and `do_bench_cudagraph` (the GPU's time alone, as
`recblr.serving.StepServer` replays it). "same" is whether both return the same top-k values (to 1e-4).
--sweep also times the kernel, in a graph, at each PROGRAMS_PER_SM (how many item ranges `_ranges` cuts) and
SELECT_BLOCK (how many candidates a program of the selection holds).
Without CUDA it runs under TRITON_INTERPRET=1 as a smoke test; its timings mean nothing.
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bdlru_kernel import against, device_label, kernel_device, time_each, write_json
from kernels import fused_score_topk, score_topk_reference
from kernels.score_topk import fused

SWEEP = {"PROGRAMS_PER_SM": (1, 2, 4, 8, 16), "SELECT_BLOCK": (512, 2048, 8192)}


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x3416,1024x3416,1x100000,1024x100000", help="comma-separated BxN")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the kernel at each range configuration")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/score_topk_kernel.json"))
    args = p.parse_args()
    device = kernel_device(p, "--shapes")
    rows = []
    for shape in tqdm(args.shapes.split(","), desc="shapes", file=sys.stderr):
        B, N = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        hidden, table = torch.randn(B, args.d_model, device=device), torch.randn(N + 1, args.d_model, device=device)[1:]
        got, want = fused_score_topk(hidden, table, args.k)[0], score_topk_reference(hidden, table, args.k)[0]
        row = {"B": B, "N": N, "same": torch.allclose(got, want, atol=1e-4, rtol=1e-5)}
        time_each(row, {"fused": lambda: fused_score_topk(hidden, table, args.k),
                        "plain": lambda: score_topk_reference(hidden, table, args.k)},
                  (fused, SWEEP) if args.sweep else None, shape)
        rows.append(row)

    name = device_label(device)
    print(f"\n{name}, D = {args.d_model}, k = {args.k}, ms (median), eager / graph, {fused.PROGRAMS_PER_SM} "
          f"programs per SM")
    print(f"{'B x N':>14} {'fused':>17} {'plain':>17} {'plain/fused':>15} same")
    for r in rows:
        print(f"{r['B']:>6} x {r['N']:<6} {against(r['fused'], r['plain'])} {r['same']}")
    write_json(args.json, device=name, rows=rows)


if __name__ == "__main__":
    main()
