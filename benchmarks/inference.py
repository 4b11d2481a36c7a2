"""Serving cost: one cached-state RecBLR step against re-running the whole sequence (RecBLR, SASRec).

    python benchmarks/inference.py [--device cuda] [--batch 1,1024] [--lengths 200,1000] [--n-items 100000]
        [--d-model 64] [--layers 2] [--repeats 100] [--threads N] [--recommend-users 100000] [--profile]
        [--out benchmarks/out/inference.json]

For each batch B and history length T: a RecBLR and a SASRec with the same D and layers (random weights,
eval mode, float32, TF32 off) and B users with T past events each. Every timed method ends in the top-10
over all items of each user, on the device, ranked by the same `model.top_k` (`kernels.score_topk`: on CUDA
the fused score + top-k, which never makes the (B, n_items + 1) scores):
  step     RecBLR.step for one new event from the cached state (the state from prefill over the T events)
  recblr   RecBLR forward over the T + 1 events, scores at the last position
  sasrec   SASRec forward over the T + 1 events (position table T + 1), scores at the last position
  score    `top_k` alone from a fixed hidden state: the part all three share
  prefill  building the state from the T events (what a new or evicted user costs once)
  step_graph  (CUDA only) `recblr.serving.StepServer.step`, prefilled with the same T events: the step, its
              in-place state update and the top-10, captured once in a CUDA graph and replayed (each call
              advances the state by one more event; small batches are launch-bound); also "replay alone",
              the median GPU time of graph replays issued back to back (`triton.testing.do_bench`), and with
              --profile the CUDA time of each kernel of a served step (torch.profiler, mean of 20 steps)
  step_graph_host_items  (CUDA only) the same served step given its new events on the host, as a server
              receives them: range-checked and copied in before the replay
p50 / p99 of `--repeats` calls, each timed with perf_counter around the call and a device synchronize;
updates/s = B / p50. The step's scores and top-10 are checked against the RecBLR forward's in the same run.
With --recommend-users, also the users/s of `pipeline.recommend.top_k` (the batch job's scoring loop).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
from tqdm import tqdm

from recblr.models import build
from recblr.serving import StepServer

OUT = Path(__file__).resolve().parent / "out" / "inference.json"
TOP = 10


def top10(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.top_k(hidden, TOP)[0]  # (B, 10): serving's ranking, padding never recommended


def timed(fn, repeats: int, device: torch.device, warmup: int = 3) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {"p50_ms": 1e3 * statistics.median(seconds),
            "p99_ms": 1e3 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]}


def profile(fn, repeats: int = 20) -> dict:
    """CUDA time of each kernel one call of fn launches (mean of `repeats` calls), largest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = {e.key: e.self_device_time_total / repeats / 1e3 for e in prof.key_averages()
               if e.self_device_time_total > 0}
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


@torch.inference_mode()
def one_shape(batch: int, length: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    recblr = build("recblr", args.n_items, d_model=args.d_model, n_layers=args.layers).to(device).eval()
    sasrec = build("sasrec", args.n_items, d_model=args.d_model, n_layers=args.layers,
                   max_len=length + 1).to(device).eval()
    items = torch.randint(1, args.n_items + 1, (batch, length + 1), device=device)  # (B, T + 1)
    past, new = items[:, :-1], items[:, -1]
    state = recblr.prefill(past)
    hidden = torch.randn(batch, args.d_model, device=device)

    step_hidden = recblr.step(new, recblr.prefill(past))  # (B, D)
    full_hidden = recblr(items)[:, -1]  # (B, D)
    agree = (top10(recblr, step_hidden) == top10(recblr, full_hidden)).all(1).float().mean().item()
    methods = {  # step advances its state in place: each timed call moves state one more event, at the same cost
        "step": lambda: top10(recblr, recblr.step(new, state)),
        "recblr": lambda: top10(recblr, recblr(items)[:, -1]),
        "sasrec": lambda: top10(sasrec, sasrec(items)[:, -1]),
        "score": lambda: top10(recblr, hidden),
        "prefill": lambda: recblr.prefill(past),
    }
    server = None
    if device.type == "cuda":  # what serving runs: one new event per user, replayed from a CUDA graph
        server = StepServer(recblr, batch, k=TOP)
        server.prefill(range(batch), past)
        methods["step_graph"] = server.capture_error or (lambda: server.step(new))
        new_on_host = new.cpu()
        methods["step_graph_host_items"] = server.capture_error or (lambda: server.step(new_on_host))
    row = {"batch": batch, "length": length, "n_items": args.n_items, "d_model": args.d_model,
           "layers": args.layers,
           "step_vs_forward_max_abs": (recblr.scores(step_hidden) - recblr.scores(full_hidden)).abs().max().item(),
           "step_vs_forward_top10_equal": agree}
    for name, fn in methods.items():
        if isinstance(fn, str):  # a capture that failed: say why, time the rest
            row[name] = {"error": fn}
            continue
        row[name] = timed(fn, args.repeats, device)
        row[name]["updates_per_s"] = batch / (row[name]["p50_ms"] / 1e3)
    if "p50_ms" in row.get("step_graph", {}):
        row["sasrec_over_step_graph"] = row["sasrec"]["p50_ms"] / row["step_graph"]["p50_ms"]
        # the GPU's share: replays back to back, so the host's per-call work and synchronize overlap them
        row["step_graph"]["replay_gpu_ms"] = triton.testing.do_bench(server.graph.replay, return_mode="median")
        if args.profile:
            row["step_graph"]["kernels_ms"] = profile(lambda: server.step(new))
    for name in ("recblr", "sasrec"):
        row[f"{name}_over_step"] = row[name]["p50_ms"] / row["step"]["p50_ms"]
        # shares the scoring floor with step; what the recurrence saves once that floor is set aside
        model_only = row["step"]["p50_ms"] - row["score"]["p50_ms"]
        row[f"{name}_over_step_without_score"] = ((row[name]["p50_ms"] - row["score"]["p50_ms"]) / model_only
                                                  if model_only > 0 else None)
    return row


@torch.inference_mode()
def batch_recommend(users: int, args, device: torch.device) -> dict:
    from pipeline.recommend import top_k as recommend_top_k
    from recblr.data import Sequences

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 51, users)
    seqs = Sequences(rng.integers(1, args.n_items + 1, int(lengths.sum())),
                     np.concatenate([[0], np.cumsum(lengths)]))
    model = build("recblr", args.n_items, d_model=args.d_model, n_layers=args.layers).to(device).eval()
    for _ in recommend_top_k(model, seqs, TOP, max_len=50, progress=False):
        break  # a warm-up chunk: the Triton kernels compile for these shapes outside the clock
    start = time.perf_counter()
    for _ in recommend_top_k(model, seqs, TOP, max_len=50):
        pass
    seconds = time.perf_counter() - start
    return {"users": users, "n_items": args.n_items, "max_len": 50, "seconds": seconds, "users_per_s": users / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", default="1,1024", help="comma-separated batch sizes (users per call)")
    parser.add_argument("--lengths", default="200,1000", help="comma-separated history lengths T")
    parser.add_argument("--n-items", type=int, default=100_000, help="catalogue size every top-10 ranks")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, help="CPU threads (default torch's); 1 on a shared box avoids "
                        "oversubscription stalls of the many tiny step ops")
    parser.add_argument("--recommend-users", type=int, default=0, help="also time batch recommendation")
    parser.add_argument("--profile", action="store_true", help="(CUDA) split a served step into its kernels")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # fp32 means fp32: TF32 convolutions or matmuls would move the step/forward check to ~1e-3
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    shapes = [(int(b), int(t)) for b in args.batch.split(",") for t in args.lengths.split(",")]
    rows = [one_shape(b, t, args, device) for b, t in tqdm(shapes, desc="shapes", file=sys.stderr)]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if args.recommend_users:
        result["recommend"] = batch_recommend(args.recommend_users, args, device)

    print(f"{result['device']}, {args.n_items:,} items, D={args.d_model}, {args.layers} layers; "
          f"p50 / p99 ms, updates/s at p50")
    print(f"{'B':>5} {'T':>5} | {'step':>17} | {'recblr fwd':>17} | {'sasrec fwd':>17} | {'score+top10':>17} | "
          f"{'prefill':>17} | {'step upd/s':>11} | sasrec/step | recblr/step | max|diff|")
    for r in rows:
        cells = " | ".join(f"{r[m]['p50_ms']:8.3f} / {r[m]['p99_ms']:6.3f}"
                           for m in ("step", "recblr", "sasrec", "score", "prefill"))
        print(f"{r['batch']:>5} {r['length']:>5} | {cells} | {r['step']['updates_per_s']:11.0f} | "
              f"{r['sasrec_over_step']:11.1f} | {r['recblr_over_step']:11.1f} | {r['step_vs_forward_max_abs']:.2e}")
    for r in rows:
        if "step_graph" in r:
            g = r["step_graph"]
            print(f"B={r['batch']} T={r['length']} step in a CUDA graph: " + (g["error"] if "error" in g else
                  f"{g['p50_ms']:.3f} / {g['p99_ms']:.3f} ms, {g['updates_per_s']:.0f} updates/s, "
                  f"sasrec/step {r['sasrec_over_step_graph']:.1f}; replay alone {g['replay_gpu_ms']:.3f} ms; "
                  f"items from the host {r['step_graph_host_items']['p50_ms']:.3f} ms"))
            for name, ms in g.get("kernels_ms", {}).items():
                print(f"    {ms:7.4f} ms  {name[:100]}")
    if "recommend" in result:
        rec = result["recommend"]
        print(f"batch recommend: {rec['users']:,} users in {rec['seconds']:.2f} s = {rec['users_per_s']:,.0f} users/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
