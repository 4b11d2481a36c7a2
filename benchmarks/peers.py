"""Table 1 on our own path: RecBLR and its baselines trained and ranked alike on prepared Amazon data.

    PYTHONPATH=. python benchmarks/peers.py data/beauty/prepared data/sports/prepared --out benchmarks/out/peers
    # three seeds each, and the paper's recipe instead of the TrainConfig defaults:
    ... --seeds 42,43,44 --regime prefix --batch-size 2048 --label-smoothing 0

Each (dataset, model, seed) trains in its own process, all at once on the one GPU: these models are too small
to fill it alone. With several seeds the table gives each metric's mean and standard deviation. Each run
gets --deadline seconds as its time budget (TrainConfig.time_budget_s): a run that would pass it stops at
the end of an epoch and is scored at its best epoch so far, marked cut. Needs torch only (no MLflow), so it
runs on the GPU machine; writes <out>/results.json and <out>/results.md (the table beside the paper's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from recblr.evaluate import metric_keys

# paper Table 1, test HR@10 and NDCG@10 (full ranking), by dataset folder name
PAPER = {
    "beauty": {"gru4rec": (0.0606, 0.0332), "sasrec": (0.0829, 0.0409), "lrurec": (0.0759, 0.0393),
               "recblr": (0.0881, 0.0446)},
    "sports": {"gru4rec": (0.0318, 0.0164), "sasrec": (0.0477, 0.0225), "lrurec": (0.0464, 0.0230),
               "recblr": (0.0500, 0.0238)},
}
METRICS = metric_keys((10, 20))


def worker(prepared: Path, model: str, out: Path, args) -> None:
    from pipeline.compare import train_one
    from recblr.train import TrainConfig

    train = TrainConfig(epochs=args.epochs, max_len=args.max_len, seed=args.seed, time_budget_s=args.deadline,
                        **recipe(args))
    result = train_one(prepared, out, model, train=train, dropout=args.dropout)
    (out / f"{model}.json").write_text(json.dumps(result, default=str))


def recipe(args) -> dict:
    """The TrainConfig fields given on the command line; the others keep TrainConfig's defaults."""
    given = {"regime": args.regime, "batch_size": args.batch_size, "label_smoothing": args.label_smoothing,
             "lr": args.lr, "weight_decay": args.weight_decay, "patience": args.patience, "cuda_graph": args.cuda_graph,
             "batch_by_length": args.batch_by_length}
    return {k: v for k, v in given.items() if v is not None}


def table(dataset: str, results: list[dict]) -> str:
    """One row per model; with several seeds each metric is mean ± standard deviation, the rest per seed."""
    paper = PAPER.get(dataset, {})
    lines = [f"| model | seeds | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 | MRR@20 | paper HR@10 | paper NDCG@10 "
             f"| epochs (best) | seconds | params |", "|" + " --- |" * 13]
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    mean_ndcg = lambda runs: statistics.mean(r["test"]["ndcg_at_10"] for r in runs)  # noqa: E731
    for model, runs in sorted(by_model.items(), key=lambda kv: -mean_ndcg(kv[1])):
        runs.sort(key=lambda r: r["seed"])
        values = [[r["test"][k] for r in runs] for k in METRICS]
        ours = " | ".join(f"{statistics.mean(v):.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "")
                          for v in values)
        ref = " | ".join(f"{v:.4f}" for v in paper[model]) if model in paper else "- | -"
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']}){' cut' if r['stopped'] == 'time budget' else ''}"
                           for r in runs)
        seconds = ", ".join(f"{float(r['seconds']):.0f}" for r in runs)
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {model} | {seeds} | {ours} | {ref} | {epochs} | {seconds} | {runs[0]['parameters']} |")
    return "\n".join(lines) + "\n"


def run_dir(out: Path, prepared: Path, seed: int) -> Path:
    return out / prepared.resolve().parent.name / f"seed{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared", nargs="+", type=Path, help="prepared/ folders; the dataset is their parent's name")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/peers"))
    parser.add_argument("--models", default="recblr,sasrec,gru4rec,lrurec,pop")
    parser.add_argument("--dropout", type=float, default=0.5, help="the paper's value for Beauty and Sports")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--seeds", default="42", help="comma-separated; each seed is its own run")
    parser.add_argument("--regime", choices=("all", "prefix"), help="default: TrainConfig's")
    parser.add_argument("--batch-size", type=int, help="default: TrainConfig's")
    parser.add_argument("--label-smoothing", type=float, help="default: TrainConfig's")
    parser.add_argument("--lr", type=float, help="default: TrainConfig's")
    parser.add_argument("--weight-decay", type=float, help="default: TrainConfig's")
    parser.add_argument("--patience", type=int, help="default: TrainConfig's")
    parser.add_argument("--cuda-graph", type=lambda v: v.lower() in ("1", "true", "on"),
                        help="true / false: TrainConfig.cuda_graph (default: TrainConfig's, on)")
    parser.add_argument("--batch-by-length", type=lambda v: v.lower() in ("1", "true", "on"),
                        help="true / false: TrainConfig.batch_by_length (default: TrainConfig's)")
    parser.add_argument("--deadline", type=float, default=480.0, help="each run's time budget, seconds")
    parser.add_argument("--worker", nargs=2, metavar=("PREPARED", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a worker's one seed
    args = parser.parse_args()
    if args.worker:
        prepared, model = Path(args.worker[0]), args.worker[1]
        worker(prepared, model, run_dir(args.out, prepared, args.seed), args)
        return
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in recipe(args).items()]

    began, procs = time.time(), {}
    for prepared in args.prepared:
        for seed in map(int, args.seeds.split(",")):
            out = run_dir(args.out, prepared, seed)
            out.mkdir(parents=True, exist_ok=True)
            for model in args.models.split(","):
                cmd = [sys.executable, __file__, *map(str, args.prepared), "--worker", str(prepared), model,
                       "--out", str(args.out), "--dropout", str(args.dropout), "--epochs", str(args.epochs),
                       "--max-len", str(args.max_len), "--seed", str(seed), "--deadline", str(args.deadline),
                       *passed]
                log = open(out / f"{model}.log", "w")
                # one CPU thread each: ten runs' default thread pools would fight over the cores
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                procs[(prepared, model, seed)] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for proc in procs.values():  # each stops itself within its budget, then scores its best epoch
        proc.wait()
    report, markdown = {}, []
    for prepared, model, seed in procs:
        dataset, out = prepared.resolve().parent.name, run_dir(args.out, prepared, seed)
        if not (out / f"{model}.json").is_file():
            print(f"{dataset}/{model}/seed{seed}: failed, see {out / f'{model}.log'}", file=sys.stderr)
            continue
        report.setdefault(dataset, []).append({**json.loads((out / f"{model}.json").read_text()), "seed": seed})
    markdown = [f"### {name}\n\n{table(name, results)}" for name, results in report.items()]
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "results.md").write_text("\n".join(markdown))
    print("\n".join(markdown))
    print(f"{time.time() - began:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
