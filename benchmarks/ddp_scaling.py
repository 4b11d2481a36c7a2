"""DDP scaling: the same training on 1 and on N GPUs (pipeline.launch.fit_on_processes), metrics and speed.

    PYTHONPATH=. python3 benchmarks/ddp_scaling.py --nproc 2      # on a machine with 2 GPUs

Data: the ML-1M-shaped synthetic set of time_to_quality.py (benchmarks/out/ml1m_synth). Two recipes, each for
a fixed number of epochs so that both process counts do the same work: the default ("all", global batch 256,
a small step that leaves each GPU mostly idle) and the paper's ("prefix", global batch 2048, ~480 steps an
epoch). Scaling efficiency = (train s/epoch on 1 GPU) / (on N GPUs) / N, epoch 1 (compilation) left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from time_to_quality import ML1M_SHAPE, RECIPES
from training_cost import ensure_prepared


def run(data_dir: Path, out: Path, recipe: str, nproc: int, epochs: int) -> dict:
    from pipeline.launch import fit_on_processes
    from recblr.train import TrainConfig

    train = TrainConfig(epochs=epochs, max_len=200, patience=epochs, regime=recipe, **RECIPES[recipe])
    result = fit_on_processes(nproc, data_dir, out / f"{recipe}_{nproc}", overrides={"dropout": 0.2}, train=train)
    per_epoch = statistics.median(r["train_seconds"] for r in result["history"][1:])
    return {"recipe": recipe, "nproc": nproc, "epochs": result["epochs"], "best_epoch": result["best_epoch"],
            "train_s_per_epoch": per_epoch, "valid": result["valid"], "test": result["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="GPUs of the multi-GPU run")
    parser.add_argument("--recipes", default="all:20,prefix:3", help="RECIPE:EPOCHS,...")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/out/ml1m_synth"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/ddp_scaling.json"))
    args = parser.parse_args()
    ensure_prepared(args.data / "prepared", ML1M_SHAPE["users"], ML1M_SHAPE["items"], ML1M_SHAPE["events_per_user"])
    rows = []
    for item in args.recipes.split(","):
        recipe, epochs = item.split(":")
        for nproc in (1, args.nproc):
            rows.append(run(args.data, args.json.parent / "ddp_runs", recipe, nproc, int(epochs)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| recipe | GPUs | epochs (best) | train s/epoch | speed-up | efficiency | valid NDCG@10 | test HR@10 "
          "| test NDCG@10 |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        one = next(r for r in rows if r["recipe"] == row["recipe"] and r["nproc"] == 1)
        speedup = one["train_s_per_epoch"] / row["train_s_per_epoch"]
        print(f"| {row['recipe']} | {row['nproc']} | {row['epochs']} ({row['best_epoch']}) | "
              f"{row['train_s_per_epoch']:.2f} | {speedup:.2f}x | {speedup / row['nproc']:.0%} | "
              f"{row['valid']['ndcg_at_10']:.4f} | {row['test']['hr_at_10']:.4f} | {row['test']['ndcg_at_10']:.4f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
