"""Compare models on one prepared dataset: same training, same full-ranking evaluation, one table.

`train_one` trains and scores one model (torch only, so benchmarks/peers.py runs it on a GPU machine
without MLflow); `compare` runs it for each model under an MLflow parent run that holds the table and the
bar chart, with one child run per model logged like a training run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from recblr.evaluate import metric_keys

METRICS = metric_keys((10, 20))  # hr/ndcg/mrr at 10 and 20
DEFAULT_MODELS = ("recblr", "sasrec", "gru4rec", "lrurec", "pop")


def train_one(prepared_dir: Path, out_dir: Path, name: str, *, train=None, overrides: Optional[dict] = None,
              dropout: Optional[float] = None, on_epoch: Optional[Callable] = None) -> dict:
    """fit() one model into out_dir/<name>; fit's result plus the model's trainable parameter count.

    dropout, if given, goes to the model when its config has a `dropout` field (the paper's one knob per
    dataset); `overrides` (config fields) win over it.
    """
    from recblr.models import load
    from recblr.train import fit

    merged = config_overrides(name, dropout, overrides)
    result = fit(prepared_dir, Path(out_dir) / name, name, overrides=merged or None, train=train, on_epoch=on_epoch)
    result["parameters"] = sum(p.numel() for p in load(result["model_path"]).parameters() if p.requires_grad)
    return result


def config_overrides(name: str, dropout: Optional[float], overrides: Optional[dict]) -> dict:
    """Model `name`'s config overrides: `dropout` where its config has that field, then `overrides` over it."""
    from recblr.models import config_fields

    shared = {"dropout": dropout} if dropout is not None and "dropout" in config_fields(name) else {}
    return {**shared, **(overrides or {})}


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per model: test metrics, then what it cost."""
    return [{"model": r["model"], **{k: r["test"][k] for k in METRICS}, "best_epoch": r["best_epoch"],
             "epochs": r["epochs"], "seconds": round(r["seconds"]), "parameters": r["parameters"]}
            for r in results]


def markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    for n, row in enumerate(rows):
        ax.bar([m + n * width for m in range(len(METRICS))], [row[k] for k in METRICS], width, label=row["model"])
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(METRICS))], [k.replace("_at_", "@").upper() for k in METRICS])
    ax.set_ylabel("test score (full ranking)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(data_dir: Path, models=DEFAULT_MODELS, *, epochs: Optional[int] = None, max_len: Optional[int] = None,
            dropout: Optional[float] = None, overrides: Optional[dict] = None,
            tracking_uri: Optional[str] = None) -> dict:
    """Train and evaluate `models` on DATA_DIR's prepared data (`recblr prepare`'s, else the newest `recblr run`
    partition's) into DATA_DIR/compare/; log it all to MLflow.

    overrides: {model: {config field: value}}. Writes comparison.md, comparison.csv and comparison.png
    beside the models' folders and returns {"rows", "best", "parent_run_id", "output"}.
    """
    import mlflow
    import pandas as pd

    from pipeline import tracking
    from pipeline.errors import PipelineError
    from pipeline.run import check_model, find_prepared, train_config
    from recblr.models import MODELS
    from recblr.train import OutOfGPUMemory, TrainingDiverged

    data_dir = Path(data_dir)
    prepared = find_prepared(data_dir)
    if not models:
        raise PipelineError(f"no model to compare; choose from {sorted(MODELS)}")
    twice = sorted({name for name in models if list(models).count(name) > 1})
    if twice:  # each model's folder, child run and table row would be written twice
        raise PipelineError(f"model(s) {twice} given more than once; name each model once")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(overrides or {}) - set(models))
    if unknown:
        raise PipelineError(f"unknown or unselected model(s) {unknown}; choose from {sorted(MODELS)}")
    for name in models:  # fields, types and ranges of every config, before the first model trains
        check_model(name, config_overrides(name, dropout, (overrides or {}).get(name)), f"compare {name}")
    train = train_config({"epochs": epochs, "max_len": max_len})
    dataset = tracking.dataset_name(data_dir)
    experiment_id = tracking.use_experiment(tracking.resolve_tracking_uri(data_dir, tracking_uri), dataset)
    out = data_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    digest = tracking.dataset_digest(prepared)
    tags = {tracking.DIGEST_TAG: digest, "recblr.dataset": dataset}
    results = []
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={**tags, "recblr.kind": "compare"}) as parent:
        mlflow.log_params({"models": ",".join(models), "dropout": dropout, **tracking.flatten("train", train)})
        for name in models:
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True,
                                  tags={**tags, "recblr.kind": "compare-model"}):
                try:
                    result = train_one(prepared, out, name, train=train, overrides=(overrides or {}).get(name),
                                       dropout=dropout, on_epoch=tracking.log_epoch)
                except (ValueError, FileNotFoundError, OutOfGPUMemory, TrainingDiverged) as err:
                    raise PipelineError(f"compare {name}: {err}") from err
                tracking.log_training(result, prepared)
                tracking.log_evaluation(result["test"], result["valid"])
                mlflow.log_metric("parameters", result["parameters"])
            results.append(result)
        rows = table_rows(results)
        (out / "comparison.md").write_text(markdown(rows))
        pd.DataFrame(rows).to_csv(out / "comparison.csv", index=False)
        bar_chart(rows, out / "comparison.png", f"{dataset}: leave-one-out test, full ranking")
        for name in ("comparison.md", "comparison.csv", "comparison.png"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_metrics({f"{row['model']}_test_{k}": row[k] for row in rows for k in METRICS})
        best = max(rows, key=lambda row: row["ndcg_at_10"])["model"]
        mlflow.set_tag("recblr.best_model", best)
    return {"rows": rows, "best": best, "parent_run_id": parent.info.run_id, "output": str(out)}
