"""One RecBLR block's serving step: the fused kernel against the PyTorch composition it replaces.

    python benchmarks/block_step_kernel.py [--batch 1,1024] [--d-model 64] [--sweep]
        [--json benchmarks/out/block_step_kernel.json]

For each batch B, one block of a RecBLR (random init, float32, eval) steps B users by one event from a random
state: `kernels.fused_block_step` (one launch) against `kernels.block_step_reference` (the composition the model
stepped with before, about twenty launches), both under no_grad with TF32 off. Medians of
`triton.testing.do_bench` (eager: launch overhead included) and `do_bench_cudagraph` (replayed from a CUDA
graph, as `recblr.serving.StepServer` runs them: the GPU's time alone). "max diff" is the largest |fused -
reference| over the output and the advanced state. --sweep also times the kernel at each (USERS,
NUM_WARPS) in a graph.
Without CUDA it runs under TRITON_INTERPRET=1 as a smoke test; its timings mean nothing.
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bdlru_kernel import against, device_label, kernel_device, time_each, write_json
from kernels import block_step_reference, fused_block_step
from kernels.block_step import fused
from recblr.models import build

SWEEP = {"USERS": (8, 16, 32), "NUM_WARPS": (4, 8)}


def make_inputs(B, D, device):
    torch.manual_seed(0)
    block = build("recblr", 10, d_model=D).blocks[0].to(device).eval()
    E, k = block.recurrent.lam.shape[0], block.recurrent.conv.kernel_size[0]
    return (torch.randn(B, D, device=device), torch.randn(B, E, k - 1, device=device),
            torch.randn(B, E, device=device), block.step_weights())


def outputs(step, inputs):
    """(out, window, h) of one step from copies of the state, which a step advances in place; the timed calls
    below advance the state itself, at the same cost each."""
    u, window, h, weights = inputs
    window, h = window.clone(), h.clone()
    return step(u, window, h, weights), window, h


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,1024", help="comma-separated batch sizes (users a step)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--sweep", action="store_true", help="also time the kernel at each launch configuration")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/block_step_kernel.json"))
    args = p.parse_args()
    device = kernel_device(p, "--batch")
    rows = []
    for B in tqdm([int(b) for b in args.batch.split(",")], desc="batches", file=sys.stderr):
        inputs = make_inputs(B, args.d_model, device)
        diff = max((a - b).abs().max().item() for a, b in zip(outputs(fused_block_step, inputs),
                                                              outputs(block_step_reference, inputs)))
        row = {"B": B, "D": args.d_model, "max_diff": diff}
        time_each(row, {"fused": lambda: fused_block_step(*inputs), "reference": lambda: block_step_reference(*inputs)},
                  (fused, SWEEP) if args.sweep else None, f"B={B}")
        rows.append(row)

    name = device_label(device)
    print(f"\n{name}, D = {args.d_model}, ms a block step (median), eager / graph")
    print(f"{'B':>6} {'fused':>17} {'reference':>17} {'reference/fused':>15} {'max diff':>9}")
    for r in rows:
        print(f"{r['B']:>6} {against(r['fused'], r['reference'])} {r['max_diff']:9.1e}")
    write_json(args.json, device=name, rows=rows)


if __name__ == "__main__":
    main()
