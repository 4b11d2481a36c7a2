"""BD-LRU kernels vs the best peer compositions and a copy of the same bytes, on one GPU in one run.

    python benchmarks/bdlru_kernel.py [--graph] [--sweep] [--profile] [--skip-peers] [--shapes 8x4096x128_fp32,...]
        [--json benchmarks/out/bdlru_kernel.json]

Every method computes out = h * silu(z) with gates from (r, i, lam), forward alone (no grad) and forward
+ backward (gradients of x, r, i, z, lam). Peers (STACK.md): torch.compile'd gates + fla's
fused_recurrent_hgrn, eager gates + fla's chunk_hgrn, compiled gates + accelerated-scan (power-of-two
padding, fp32 only), and the torch loop of the reference. The floor is a device copy of the bytes the
op must move: inputs read once, outputs written once. `--profile` splits one bdlru fwd+bwd into its CUDA
kernels and says how long the host takes to issue a call, to tell launch-bound shapes from slow kernels.
"""
import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tqdm import tqdm

from kernels import bdlru_reference, chunk_bdlru, fused_recurrent_bdlru
from kernels.bdlru import fused_recurrent, use_chunk
from kernels.device import interpreting

SHAPES = [(2048, 200, 128, "fp32"), (512, 1024, 128, "fp32"), (8, 4096, 128, "fp32"), (2048, 200, 128, "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (BT, BD, num_warps) tried for the sequential launcher, each direction alone
SWEEP = [(4, 64, 1), (4, 32, 1), (4, 16, 1), (8, 32, 1), (8, 16, 1), (8, 64, 1), (8, 64, 2), (16, 32, 1),
         (16, 16, 1), (16, 64, 2), (4, 128, 1), (8, 128, 2), (2, 64, 1), (2, 32, 1), (2, 128, 1), (2, 128, 2),
         (1, 64, 1), (1, 128, 1), (2, 64, 2), (4, 64, 2), (4, 128, 2)]
# (BT, chunk length, BD, num_warps) tried for the chunked launcher, whose programs hold one chunk each
CHUNK_SWEEP = [(bt, ct, bd, w) for bt in (16, 32) for ct in (bt, 4 * bt, 256, 512) for bd in (8, 16, 32)
               for w in (1, 2, 4) if bt * bd <= 256 * w]


def bench(fn, graph=False):
    """Median ms per call. graph=True replays the calls from a CUDA graph: the GPU's time alone, without
    the host's (Python, autograd and launch overhead, which bounds small shapes in eager mode). Without CUDA
    (a script smoke-tested on the CPU under TRITON_INTERPRET=1) the wall clock of three calls after one."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_knobs(module, knobs: dict, fn) -> dict:
    """Median ms of fn in a CUDA graph with each combination of module-level knobs ({name: values}) set on
    module, keyed by str(tuple of values); the module's own values are restored after."""
    saved = {name: getattr(module, name) for name in knobs}
    times = {}
    for values in itertools.product(*knobs.values()):
        for name, value in zip(knobs, values):
            setattr(module, name, value)
        times[str(values)] = bench(fn, graph=True)
    for name, value in saved.items():
        setattr(module, name, value)
    return times


def bench_modes(fn) -> dict:
    """{"eager": ms, "graph": ms}: `bench` of fn both ways."""
    return {mode: bench(fn, graph=mode == "graph") for mode in ("eager", "graph")}


def against(fused: dict, baseline: dict) -> str:
    """Table cells of a kernel against the composition it replaces, each a `bench_modes` result: both
    times eager / graph, then baseline / fused for each."""
    return (f"{fused['eager']:7.4f} / {fused['graph']:7.4f} {baseline['eager']:7.4f} / {baseline['graph']:7.4f} "
            f"{baseline['eager'] / fused['eager']:6.1f} / {baseline['graph'] / fused['graph']:5.1f}x")


def fastest(times: dict, n: int = 4) -> str:
    """The n quickest entries of a `sweep_knobs` result, for a progress line."""
    return ", ".join(f"{c} {ms:.4f}" for c, ms in sorted(times.items(), key=lambda kv: kv[1])[:n])


def time_each(row: dict, fns: dict, sweep=None, label: str = "") -> None:
    """`bench_modes` of each zero-argument function of fns ({name: fn}) into row[name]. sweep = (module, knobs):
    also `sweep_knobs` of the first into row["sweep"], its fastest printed after label as it comes."""
    for name, fn in fns.items():
        row[name] = bench_modes(fn)
    if sweep is not None:
        module, knobs = sweep
        row["sweep"] = sweep_knobs(module, knobs, next(iter(fns.values())))
        print(f"sweep {label} {tuple(knobs)}: {fastest(row['sweep'])}", flush=True)


def write_json(path: Path, **fields) -> None:
    """fields as one JSON object at path, its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1))


def kernel_device(parser: argparse.ArgumentParser, sizes: str) -> str:
    """"cuda", else "cpu" under TRITON_INTERPRET=1 (a smoke test at small `sizes`), else the parser's error;
    TF32 off, so float32 products are compared in float32."""
    if not torch.cuda.is_available() and not interpreting():
        parser.error(f"no CUDA: set TRITON_INTERPRET=1 to smoke-test on the CPU at small {sizes}")
    torch.backends.cuda.matmul.allow_tf32 = False
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label(device: str) -> str:
    """What heads a kernel benchmark's table: the GPU, or a warning that interpreter timings mean nothing."""
    return torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (not a timing)"


def _gates(x, r, i, lam):
    log_a = -F.softplus(lam.float()) * torch.sigmoid(r.float())
    a = log_a.exp()
    bx = torch.sqrt(1 - a * a + 1e-8) * torch.sigmoid(i.float()) * x.float()
    return log_a, bx


def _fla_inputs(x, r, i, lam):
    log_a, bx = _gates(x, r, i, lam)
    return log_a.to(x.dtype), bx.to(x.dtype)


def _gate_out(h, z):
    return h * F.silu(z)


def _acc_inputs(x, r, i, lam):
    # (B, T, D) -> (B, D, Tp): accelerated-scan's layout, T padded to a power of two with a=1, b*x=0
    log_a, bx = _gates(x, r, i, lam)
    pad = triton.next_power_of_2(x.shape[1]) - x.shape[1]
    a = F.pad(log_a.exp().transpose(1, 2), (0, pad), value=1.0).contiguous()
    return a, F.pad(bx.transpose(1, 2), (0, pad)).contiguous()


def peers():
    from accelerated_scan.scalar import scan as acc_scan
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn

    # static shapes: inductor cannot pad to a symbolic next power of two
    fla_inputs, gate_out, acc_inputs = (torch.compile(f, dynamic=False) for f in (_fla_inputs, _gate_out, _acc_inputs))

    def compiled_fused_recurrent_hgrn(x, r, i, lam, z):
        return gate_out(fused_recurrent_hgrn(*fla_inputs(x, r, i, lam))[0], z)

    def eager_chunk_hgrn(x, r, i, lam, z):
        return _gate_out(chunk_hgrn(*_fla_inputs(x, r, i, lam))[0], z)

    def accelerated_scan_pow2(x, r, i, lam, z):
        if x.dtype != torch.float32:
            raise NotImplementedError("accelerated-scan 0.3.1 crashes on bf16")
        h = acc_scan(*acc_inputs(x, r, i, lam))[..., : x.shape[1]].transpose(1, 2)
        return gate_out(h, z)

    def torch_loop(x, r, i, lam, z):
        return bdlru_reference(x, r, i, lam, z=z).to(x.dtype)

    return {
        "compile+fused_recurrent_hgrn": compiled_fused_recurrent_hgrn,
        "eager+chunk_hgrn": eager_chunk_hgrn,
        "compile+accelerated_scan": accelerated_scan_pow2,
        "torch_loop": torch_loop,
    }


class NoKernel(torch.autograd.Function):
    """bdlru's autograd contract with no GPU work but the output allocations: what the host spends on any
    such op (Python, autograd, the allocator) before a kernel is launched, the host's floor for a call."""

    @staticmethod
    def forward(ctx, x, r, i, lam, z):
        ctx.save_for_backward(x, r, i, lam, z)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def no_kernel(x, r, i, lam, z):
    return NoKernel.apply(x, r, i, lam, z)


def time_method(fn, inputs, do, graph=False):
    def forward():
        with torch.no_grad():
            fn(**inputs)

    diff = [inputs[k] for k in ("x", "r", "i", "lam", "z")]
    return bench(forward, graph), bench(lambda: torch.autograd.grad(fn(**inputs), diff, do), graph)


def copy_ms(nbytes, graph=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # see bench
    src = torch.randn(nbytes // 8, device=device)  # float32: the copy reads and writes nbytes / 2 each
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), graph)


def sweep(inputs, do, chunked):
    """Forward and backward launchers alone for each (BT, [chunk length,] BD, num_warps): {config: (fwd ms,
    fwd ms writing the checkpoint, bwd ms)}: inference runs the first forward, training the second."""
    args = [inputs[k].detach() for k in ("x", "r", "i", "lam", "z")]
    res = {}
    for config in CHUNK_SWEEP if chunked else SWEEP:
        BT, *ct, BD, w = config
        ct = ct[0] if chunked else None
        fwd_fn = lambda store: fused_recurrent.bdlru_fwd(*args, None, store, False, BT, BD, w, chunk=ct)  # noqa: E731
        bwd_fn = lambda ckpt: fused_recurrent.bdlru_bwd(*args, ckpt, do, None, False, BT, BD, w, chunk=ct)  # noqa: E731
        _, ckpt, _ = fwd_fn(True)
        res[config] = (bench(lambda: fwd_fn(False)), bench(lambda: fwd_fn(True)), bench(lambda: bwd_fn(ckpt)))
    return res


def host_ms(step, calls=10):
    """Host ms to issue one call: the GPU queue is deep enough that `calls` calls never wait on it."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - began
    torch.cuda.synchronize()
    return elapsed * 1e3 / calls


def profile(fn, inputs, do):
    """CUDA time of each kernel in one fwd+bwd (mean of 10 calls), and host ms to issue one call, also for
    `no_kernel`, the autograd plumbing alone."""
    diff = [inputs[k] for k in ("x", "r", "i", "lam", "z")]
    step = lambda fn: torch.autograd.grad(fn(**inputs), diff, do)  # noqa: E731
    host = {"host_ms_per_call": host_ms(lambda: step(fn)), "no_kernel_host_ms_per_call": host_ms(lambda: step(no_kernel))}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(fn)
        torch.cuda.synchronize()
    kernels = {e.key: e.self_device_time_total / 10e3 for e in prof.key_averages() if e.self_device_time_total > 0}
    return host | {"kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1]))}


def make_inputs(B, T, D, dtype):
    """x, r, i, lam, z (leaves that need grad) and the upstream gradient do, the same for every method."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    inputs = dict(x=rand(B, T, D), r=rand(B, T, D), i=rand(B, T, D), lam=rand(D), z=rand(B, T, D))
    return inputs, torch.randn(B, T, D, device="cuda", generator=g).to(dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/bdlru_kernel.json"))
    p.add_argument("--sweep", action="store_true", help="also time each tile configuration of the launcher bdlru picks")
    p.add_argument("--profile", action="store_true", help="split bdlru fwd+bwd into its CUDA kernels")
    p.add_argument("--graph", action="store_true", help="also time every method replayed from a CUDA graph")
    p.add_argument("--skip-peers", action="store_true", help="time only ours and the floor (peers take most time)")
    p.add_argument("--shapes", default=",".join(f"{B}x{T}x{D}_{dt}" for B, T, D, dt in SHAPES),
                   help="comma-separated BxTxD_dtype (default: all four)")
    args = p.parse_args()
    shapes = [(int(b), int(t), int(d), dt) for b, t, d, dt in
              (s.replace("_", "x").split("x") for s in args.shapes.split(","))]
    ours = {"fused_recurrent": fused_recurrent_bdlru, "chunk": chunk_bdlru}
    methods = ours if args.skip_peers else ours | peers()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows, sweeps, profiles = [], {}, {}
    for B, T, D, dt in tqdm(shapes, desc="shapes", file=sys.stderr):
        dtype = DTYPES[dt]
        inputs, do = make_inputs(B, T, D, dtype)
        n = B * T * D * inputs["x"].element_size()
        row = {"B": B, "T": T, "D": D, "dtype": dt,
               "floor": (copy_ms(5 * n), copy_ms(14 * n))}  # fwd: x r i z -> out; bwd: + do -> dx dr di dz
        for graph in (False, True) if args.graph else (False,):
            timed = row
            if graph:  # the same methods again, with the floor, in a table of their own
                timed = row["graph"] = {"floor": (copy_ms(5 * n, True), copy_ms(14 * n, True))}
            for name, fn in methods.items():
                if graph and name == "torch_loop":  # thousands of tiny launches: the eager time says enough
                    continue
                try:
                    timed[name] = time_method(fn, inputs, do, graph)
                except Exception as e:  # a peer that cannot run this shape (or be captured) is reported
                    timed[name] = None
                    print(f"{name} at {(B, T, D, dt)}{' graph' if graph else ''}: {type(e).__name__}: "
                          f"{str(e)[:200]}", file=sys.stderr)
                torch.cuda.empty_cache()
        chunked = use_chunk(B, T, D, dtype, n_sm)  # bdlru's own choice between the two
        for timed in (row, row.get("graph", {})):
            timed["bdlru"] = timed.get("chunk" if chunked else "fused_recurrent")
        print(f"{B}x{T}x{D}_{dt}: " + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in row.items()
                                                if isinstance(v, tuple)), flush=True)
        shape = f"{B}x{T}x{D}_{dt}"
        if args.sweep:  # printed as it comes: a sweep is the long part of a run
            res = sweeps[shape] = {str(c): ms for c, ms in sweep(inputs, do, chunked).items()}
            for j, step in enumerate(("fwd", "fwd+ckpt", "bwd")):
                best = sorted(res.items(), key=lambda kv: kv[1][j])[:4]
                print(f"sweep {shape} {step}: " + ", ".join(f"{c} {ms[j]:.3f}" for c, ms in best), flush=True)
        rows.append(row)
    # after every timing: CUDA graphs of the compiled peers captured after a profiler session crashed (H100,
    # torch 2.11: an illegal memory access in the next shape's compile + accelerated_scan graph)
    for B, T, D, dt in shapes if args.profile else ():
        dtype = DTYPES[dt]
        inputs, do = make_inputs(B, T, D, dtype)
        shape = f"{B}x{T}x{D}_{dt}"
        prof = profiles[shape] = profile(chunk_bdlru if use_chunk(B, T, D, dtype, n_sm) else fused_recurrent_bdlru,
                                         inputs, do)
        print(f"profile {shape}: host {prof['host_ms_per_call']:.3f} ms/call (no_kernel "
              f"{prof['no_kernel_host_ms_per_call']:.3f}); " + ", ".join(
            f"{k[:40]} {ms:.3f}" for k, ms in list(prof["kernels_ms"].items())[:8]), flush=True)

    peer_names = [k for k in methods if k not in (*ours, "torch_loop")]
    for mode in ("eager", "graph") if args.graph else ("eager",):
        print(f"\n{torch.cuda.get_device_name()}, {mode} (fwd / fwd+bwd, ms, median; best peer taken per column)")
        print(f"{'B,T,D dtype':22} {'floor':>13} {'bdlru':>13} {'best peer':>13} {'vs floor':>11} {'vs peer':>11}")
        for row in rows:
            timed = row if mode == "eager" else row["graph"]
            best = [min((timed[k][j] for k in peer_names if timed.get(k)), default=float("nan")) for j in range(2)]
            timed["best_peer"] = best
            f, fl = timed["bdlru"] or (float("nan"),) * 2, timed["floor"]
            print(f"{row['B']},{row['T']},{row['D']} {row['dtype']:10} {fl[0]:6.3f}/{fl[1]:6.3f} "
                  f"{f[0]:6.3f}/{f[1]:6.3f} {best[0]:6.3f}/{best[1]:6.3f} {f[0] / fl[0]:4.2f}/{f[1] / fl[1]:4.2f}x "
                  f"{best[0] / f[0]:4.2f}/{best[1] / f[1]:4.2f}x")
            for k in methods:
                v = timed.get(k)
                print(f"    {k:30} " + (f"{v[0]:8.3f} / {v[1]:8.3f}" if v else "n/a"))
    write_json(args.json, device=torch.cuda.get_device_name(), rows=rows, sweep=sweeps, profile=profiles)


if __name__ == "__main__":
    main()
