"""Training cost against sequence length (paper Figure 4): RecBLR vs SASRec, time per epoch, tokens/s, peak memory.

    PYTHONPATH=. python3 benchmarks/training_cost.py --device cuda                        # the GPU run
    .venv/bin/python benchmarks/training_cost.py --device cpu --lengths 50,200 --users 200   # a CPU smoke run

Data shaped like the paper's XLong sample: --users users with about --events-per-user events each (5,000 x
800), from pipeline.synthetic.generate_events over a --items vocabulary kept small (1,000) so that the full
softmax does not hide the sequence model's cost. Every (model, length) runs in its own process, so the peak
memory is its own and an out-of-memory ends only that row: a few warm-up batches (kernel compilation), then
--epochs timed epochs of recblr.train.train_epoch (the row is their median), regime "all" (each user's
history cut into windows of T), batch --batch-size windows (the paper's 512 for XLong). tokens/s counts real
(non-padding) input positions.
Peak memory: torch.cuda.max_memory_allocated of the worker on a GPU, warm-up included (a CUDA graph's memory is
allocated when it is captured, in the warm-up), the process's peak RSS on a CPU.
"sasrec-math" is SASRec with PyTorch's plain T x T attention, like RecBole's SASRec that the paper timed;
"sasrec" uses scaled_dot_product_attention's fused (flash / memory-efficient) kernels.
The figure (seconds an epoch and peak memory against T, a line per model and mode) goes beside the JSON, unless
matplotlib is missing. `--plot` draws one from earlier runs' JSON files, several runs (precisions, modes) together:

    .venv/bin/python benchmarks/training_cost.py --plot fp32.json bf16.json --png figure4.png
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

MIN_EVENTS = 5  # users with fewer are dropped, as prepare's 5-core would


def synthetic_prepared(prepared_dir: Path, n_users: int, n_items: int, mean_events: int, seed: int = 0) -> Path:
    """prepare's output layout straight from pipeline.synthetic.generate_events, with numpy instead of DuckDB.

    The GPU machine has no DuckDB. Differences from `recblr prepare`: users with fewer than MIN_EVENTS events
    are dropped but items are not filtered (at these sizes every item has far more than 5 events anyway).
    """
    from pipeline.synthetic import generate_events

    prepared_dir = Path(prepared_dir)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    events = generate_events(n_users, n_items, seed, mean_events)
    users = events.column("user_id").combine_chunks().dictionary_encode()
    items = events.column("item_id").combine_chunks().dictionary_encode()
    u, it = users.indices.to_numpy(), items.indices.to_numpy()
    order = np.lexsort((events.column("timestamp").to_numpy(), u))  # by user, then time (strictly increasing)
    u, it = u[order], it[order]
    kept = np.bincount(u, minlength=len(users.dictionary)) >= MIN_EVENTS
    it = it[kept[u]]
    lengths = np.bincount(u, minlength=len(kept))[kept]
    seen, item_idx = np.unique(it, return_inverse=True)
    item_idx = (item_idx + 1).astype(np.int32)  # dense 1..N; 0 is padding
    ends = np.cumsum(lengths)
    hist_len = lengths - 2
    hist_off = np.concatenate([[0], np.cumsum(hist_len)]).astype(np.int32)
    hist = np.concatenate([item_idx[e - n:e - 2] for e, n in zip(ends, lengths)])
    pq.write_table(pa.table({
        "user_idx": pa.array(np.arange(len(lengths), dtype=np.int32)),
        "history": pa.ListArray.from_arrays(pa.array(hist_off), pa.array(hist, pa.int32())),
        "valid_item": pa.array(item_idx[ends - 2]),
        "test_item": pa.array(item_idx[ends - 1]),
    }), prepared_dir / "sequences.parquet")
    pq.write_table(pa.table({
        "item_idx": pa.array(np.arange(1, len(seen) + 1, dtype=np.int32)),
        "item_id": items.dictionary.take(pa.array(seen)),
        "count": pa.array(np.bincount(item_idx, minlength=len(seen) + 1)[1:].astype(np.int64)),
    }), prepared_dir / "items.parquet")
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(len(lengths), dtype=np.int32)),
                             "user_id": users.dictionary.take(pa.array(np.flatnonzero(kept)))}),
                   prepared_dir / "users.parquet")
    summary = {"users": int(len(lengths)), "items": int(len(seen)), "interactions": int(lengths.sum()),
               "min_count": MIN_EVENTS, "generator": {"n_users": n_users, "n_items": n_items,
                                                      "mean_events": mean_events, "seed": seed}}
    (prepared_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return prepared_dir


def ensure_prepared(prepared_dir: Path, n_users: int, n_items: int, mean_events: int) -> dict:
    """Reuse prepared_dir when it was generated with these arguments, else (re)generate it."""
    want = {"n_users": n_users, "n_items": n_items, "mean_events": mean_events, "seed": 0}
    path = Path(prepared_dir) / "summary.json"
    if not (path.is_file() and json.loads(path.read_text()).get("generator") == want):
        synthetic_prepared(prepared_dir, n_users, n_items, mean_events)
    return json.loads(path.read_text())


def measure(prepared: Path, model: str, T: int, args) -> dict:
    """One (model, T): warm-up batches, then the timed epochs; runs in a worker process of its own."""
    from recblr.data import load_prepared, training_flat, training_windows
    from recblr.models import build
    from recblr.train import TrainConfig, epoch_order, optimizer, stepped, train_epoch, training_step

    cuda = args.device.startswith("cuda")
    cfg = TrainConfig(batch_size=args.batch_size, max_len=T, regime="all", device=args.device,
                      precision=args.precision, epochs=1, compile=args.compile, recompute=args.recompute,
                      cuda_graph=not args.no_cuda_graph, batch_by_length=args.by_length)
    data = load_prepared(prepared)
    torch.manual_seed(0)
    name = "sasrec" if model.startswith("sasrec") else model
    net = build(name, data.n_items, **({"max_len": T} if name == "sasrec" else {})).to(args.device)
    opt = optimizer(net, cfg)
    start, stop = training_windows(data.history, T, "all")
    step = training_step(stepped(net, cfg), opt, training_flat(data.history, args.device), cfg)
    order = epoch_order(stop - start, cfg, 0)
    attention = contextlib.nullcontext()
    if model == "sasrec-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(SDPBackend.MATH)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as fit does
    with attention:
        train_epoch(step, start, stop, order[:args.warmup * args.batch_size], cfg, desc=f"{model} T={T} warm-up")
        if cuda:
            torch.cuda.synchronize()
        epochs_s = []
        for _ in range(args.epochs):
            began = time.perf_counter()
            loss = train_epoch(step, start, stop, order, cfg, desc=f"{model} T={T}")
            if cuda:
                torch.cuda.synchronize()
            epochs_s.append(time.perf_counter() - began)
        seconds = statistics.median(epochs_s)
        if args.profile:
            profile(step, start, stop, order, cfg, args, name=f"{model}_T{T}")
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = int((stop - start).sum())
    return {"model": model, "T": T, "epoch_s": seconds, "epochs_s": epochs_s, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "peak_mb": peak / 2**20,
            "peak_kind": "cuda_max_allocated" if cuda else "process_peak_rss", "windows": len(start), "loss": loss,
            "precision": args.precision, "device": args.device}


def profile(step, start, stop, order, cfg, args, name: str) -> None:
    """GPU kernels of `args.profile` training batches, by total device time, to profile_<model>_T<T>.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from recblr.train import train_epoch

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        train_epoch(step, start, stop, order[:args.profile * cfg.batch_size], cfg, desc=f"{name} profile")
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cfg.device.startswith("cuda") else "self_cpu_time_total"
    path = args.json.with_name(f"profile_{name}.txt")
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))


MODES = ("compile", "recompute", "no_cuda_graph", "by_length")  # the flags a line's label names
PEAK_KINDS = {"cuda_max_allocated": "GPU, allocated", "process_peak_rss": "process RSS"}


def plot(runs: list[dict], png: Path) -> dict[str, list[int]]:
    """Seconds an epoch and peak memory against T, log-log, a line per model, precision and mode of `runs` (JSON
    files this script wrote), to png; rows that failed (out of memory, cut) are left out. Returns each label's T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    lines: dict[tuple[str, str], list[dict]] = {}  # (model, mode) -> its rows
    for run in runs:
        flags = [flag.replace("_", "-") for flag in MODES if run["args"].get(flag) == "True"]
        for row in run["rows"]:
            if "error" not in row:
                lines.setdefault((row["model"], " ".join([row["precision"], *flags])), []).append(row)
    modes = sorted({mode for _, mode in lines})  # a colour a mode, a line style a model
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (model, mode), rows in sorted(lines.items()):
        rows.sort(key=lambda r: r["T"])
        style = {"marker": "o", "linestyle": "-" if model == "recblr" else "--", "label": f"{model} {mode}",
                 "color": f"C{modes.index(mode) % 10}"}
        time_ax.plot([r["T"] for r in rows], [r["epoch_s"] for r in rows], **style)
        memory_ax.plot([r["T"] for r in rows], [r["peak_mb"] / 1024 for r in rows], **style)
    kinds = sorted({PEAK_KINDS[row["peak_kind"]] for rows in lines.values() for row in rows})
    lengths = sorted({row["T"] for rows in lines.values() for row in rows})
    for ax, label in ((time_ax, "seconds an epoch (same tokens at every T)"),
                      (memory_ax, f"peak GB ({', '.join(kinds)})")):
        ax.set(xscale="log", yscale="log", xlabel="max length T", ylabel=label, xticks=lengths)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    time_ax.legend(fontsize=8)
    data = runs[0]["data"]
    fig.suptitle(f"Training cost against length: {data['users']:,} users, {data['interactions']:,} events, "
                 f"{data['items']:,} items", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {f"{model} {mode}": [r["T"] for r in rows] for (model, mode), rows in lines.items()}


def save_plot(runs: list[dict], png: Path) -> None:
    try:
        plot(runs, png)
    except ImportError:
        print("matplotlib is not installed: no figure; draw it elsewhere with --plot", file=sys.stderr)
        return
    print(f"wrote {png}", file=sys.stderr)


def _ratio(theirs: float, ours: float, better: str, worse: str) -> str:
    """'1.71x faster' or '1.25x slower': a ratio under 1 printed as 'faster' reads as the opposite."""
    return f"{theirs / ours:.2f}x {better}" if theirs >= ours else f"{ours / theirs:.2f}x {worse}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="recblr,sasrec,sasrec-math")
    parser.add_argument("--lengths", default="50,200,500,1000,2000,4096")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--events-per-user", type=int, default=800)
    parser.add_argument("--items", type=int, default=1000, help="vocabulary: small, so the softmax does not dominate")
    parser.add_argument("--batch-size", type=int, default=512, help="windows per step (the paper's XLong batch)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=5,
                        help="batches before the timed epochs (a CUDA graph is captured at the 4th)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs; the row is their median")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per (model, length) before it is cut")
    parser.add_argument("--compile", action="store_true",
                        help="TrainConfig.compile: torch.compile every model's training forward")
    parser.add_argument("--recompute", action="store_true",
                        help="TrainConfig.recompute: every model re-runs its blocks in the backward")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="TrainConfig.cuda_graph off: every step issued op by op, as under DDP")
    parser.add_argument("--by-length", action="store_true",
                        help="TrainConfig.batch_by_length: batches of windows of similar length")
    parser.add_argument("--profile", type=int, default=0, metavar="BATCHES",
                        help="after the timed epochs, profile this many batches to profile_<model>_T<T>.txt")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/out/xlong_synth/prepared"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/training_cost.json"))
    parser.add_argument("--png", type=Path, help="the figure (default: --json's path with .png)")
    parser.add_argument("--plot", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: draw the figure of these earlier runs' JSON files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # MODEL:T, run by the parent in a fresh process
    args = parser.parse_args()
    png = args.png or args.json.with_suffix(".png")
    if args.plot:
        save_plot([json.loads(path.read_text()) for path in args.plot], png)
        return
    if args.worker:
        model, T = args.worker.split(":")
        print(json.dumps(measure(args.data, model, int(T), args)))
        return

    summary = ensure_prepared(args.data, args.users, args.items, args.events_per_user)
    print(f"data: {summary['users']} users, {summary['items']} items, {summary['interactions']} events "
          f"({summary['interactions'] / summary['users']:.0f} per user) in {args.data}", file=sys.stderr)
    rows = []
    configs = [(m, int(T)) for T in args.lengths.split(",") for m in args.models.split(",")]
    for model, T in tqdm(configs, desc="training cost", unit="run"):
        cmd = [sys.executable, __file__, "--worker", f"{model}:{T}", *sys.argv[1:]]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            error = None if done.returncode == 0 and lines else (
                "out of memory" if "out of memory" in done.stderr.lower() else done.stderr.strip()[-300:])
        except subprocess.TimeoutExpired:
            lines, error = [], f"cut at {args.timeout:.0f} s"
        rows.append(json.loads(lines[-1]) if not error else {"model": model, "T": T, "error": error})
        run = {"data": summary, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=1))

    print(f"| model | T | s / epoch | tokens/s | peak MB ({rows[0].get('peak_kind', 'peak')}) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['T']} | {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['T']} | {r['epoch_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} |")
    ours = {r["T"]: r for r in rows if r["model"] == "recblr" and "error" not in r}
    for r in rows:
        if r["model"] != "recblr" and "error" not in r and r["T"] in ours:
            o = ours[r["T"]]
            print(f"T={r['T']}: recblr vs {r['model']}: {_ratio(r['epoch_s'], o['epoch_s'], 'faster', 'slower')}, "
                  f"{_ratio(r['peak_mb'], o['peak_mb'], 'less memory', 'more memory')}")
    if len(ours) > 1:  # linear in T: seconds per epoch per token position of the padded windows
        Ts = sorted(ours)
        print("recblr s/epoch relative to T=" + str(Ts[0]) + ": "
              + ", ".join(f"T={T} {ours[T]['epoch_s'] / ours[Ts[0]]['epoch_s']:.2f}" for T in Ts))
    print(f"wrote {args.json}", file=sys.stderr)
    save_plot([run], png)


if __name__ == "__main__":
    main()
