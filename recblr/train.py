"""Training: full-softmax cross-entropy over every item, Adam, early stopping on validation NDCG@10.

Two regimes over the same windows (recblr.data.training_windows): the paper's "prefix" (every prefix of a
training sequence is a sample, loss at its last position) and "all" (one window per user, loss at every
position). An epoch's shuffle and dropout depend only on (seed, epoch) and each epoch ends with a checkpoint,
so a killed run restarted with resume=True replays the remaining epochs exactly.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recblr.data import gather, load_prepared, training_windows
from recblr.evaluate import evaluate
from recblr.models import build, load, save

# fields a resumed run may change: they alter neither the model nor what an epoch computes
RESUMABLE_CHANGES = {"epochs", "device", "eval_batch_size"}


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the recipe that was best on the validation split of Amazon Beauty (benchmarks/RESULTS.md).

    The paper's own recipe is regime="prefix", batch_size=2048, label_smoothing=0.0; on Beauty and Sports it
    reached the same validation NDCG@10 as "all" without smoothing, and smoothing 0.1 lifted both regimes.
    "all" is the default because an epoch reads each user once instead of once per event, which is what
    lets the default run finish on a CPU in minutes.
    """
    epochs: Optional[int] = None  # None: 300 on a GPU (early stopping ends it first), 4 on a CPU
    batch_size: int = 256  # user windows ("all") or samples ("prefix") per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    max_len: int = 50  # the paper: 50 for Beauty/Sports/Steam, 100 Gowalla, 200 ML-1M
    regime: str = "all"  # "all" (loss at every position) or "prefix" (the paper's)
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    seed: int = 42
    device: str = "auto"  # "auto": cuda when available
    eval_batch_size: int = 4096

    def __post_init__(self):
        if self.regime not in ("prefix", "all"):
            raise ValueError(f"TrainConfig: regime must be 'prefix' or 'all', got {self.regime!r}")
        if (self.epochs is not None and self.epochs < 1) or min(self.batch_size, self.max_len, self.patience) < 1:
            raise ValueError(f"TrainConfig: epochs, batch_size, max_len and patience must be >= 1, got {self}")

    def resolved(self) -> "TrainConfig":
        cuda = torch.cuda.is_available()
        device = ("cuda" if cuda else "cpu") if self.device == "auto" else self.device
        epochs = self.epochs or (300 if device.startswith("cuda") else 4)
        return dataclasses.replace(self, device=device, epochs=epochs)


def batch_loss(net, flat: np.ndarray, start: np.ndarray, stop: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    items = gather(flat, start, stop).to(cfg.device)  # (B, T)
    targets = gather(flat, start + 1, stop + 1).to(cfg.device)  # (B, T): the next item, 0 past the end
    if cfg.regime == "prefix":
        last = torch.from_numpy(stop - start - 1).to(cfg.device)  # (B,)
        targets = torch.where(torch.arange(targets.shape[1], device=cfg.device) == last[:, None], targets, 0)
    scored = targets != 0
    logits = net.scores(net(items)[scored]).float()  # (n, n_items + 1): only positions with a loss
    return F.cross_entropy(logits, targets[scored], label_smoothing=cfg.label_smoothing)


def fit(prepared_dir: Path, run_dir: Path, model: str = "recblr", *, overrides: Optional[dict] = None,
        train: Optional[TrainConfig] = None, resume: bool = False,
        on_epoch: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `model` on prepared_dir; run_dir gets checkpoint.pt (latest) and model.pt (best validation).

    Returns {"model", "config", "train", "epochs", "best_epoch", "valid", "test", "history", "model_path",
    "seconds"}; on_epoch(epoch, record) is called after each epoch's checkpoint is written.
    """
    began = time.time()
    cfg = (train or TrainConfig()).resolved()
    run_dir, data = Path(run_dir), load_prepared(prepared_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path = run_dir / "checkpoint.pt", run_dir / "model.pt"
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the scores matmul dominates; TF32 is ample for ranking
    torch.manual_seed(cfg.seed)
    net = build(model, data.n_items, **(overrides or {}))
    if hasattr(net, "fit_counts"):  # the popularity baseline reads its table from the training histories
        net.fit_counts(data.item_counts())
    net = net.to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "history": [], "best_ndcg": -1.0, "best_epoch": 0, "stale": 0}
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"{checkpoint_path}: nothing to resume; train without --resume first")
        blob = torch.load(checkpoint_path, map_location=cfg.device, weights_only=True)
        mine = {"model": model, "config": dataclasses.asdict(net.config),
                "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}}
        theirs = {"model": blob["model"], "config": blob["config"],
                  "train": {k: v for k, v in blob["train"].items() if k not in RESUMABLE_CHANGES}}
        if mine != theirs:
            raise ValueError(f"{checkpoint_path}: saved with other settings {theirs}, now {mine}")
        net.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        state = blob["progress"]

    start, stop = training_windows(data.history, cfg.max_len, cfg.regime)
    if len(start) == 0:
        raise ValueError(f"{prepared_dir}: no training sequence has two events; nothing to learn from")
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stale"] >= cfg.patience:
            break
        torch.manual_seed(cfg.seed + epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(start))
        net.train()
        epoch_began, loss_sum = time.time(), 0.0
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch")
        for n, lo in enumerate(bar, 1):
            batch = order[lo:lo + cfg.batch_size]
            loss = batch_loss(net, data.history.flat, start[batch], stop[batch], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            speed = (lo + len(batch)) / (time.time() - epoch_began)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", seq_s=f"{speed:.0f}")
        valid = evaluate(net, data, "valid", max_len=cfg.max_len, batch_size=cfg.eval_batch_size)
        record = {"epoch": epoch, "loss": loss_sum / n, "seconds": time.time() - epoch_began,
                  **{f"val_{k}": v for k, v in valid.items()}}
        state["history"].append(record)
        state["epoch"] = epoch
        if valid["ndcg_at_10"] > state["best_ndcg"]:
            state.update(best_ndcg=valid["ndcg_at_10"], best_epoch=epoch, stale=0)
            save(net, model_path, train=dataclasses.asdict(cfg), epoch=epoch)
        else:
            state["stale"] += 1
        tmp = checkpoint_path.with_suffix(".pt.tmp")
        torch.save({"model": model, "config": dataclasses.asdict(net.config), "train": dataclasses.asdict(cfg),
                    "state_dict": net.state_dict(), "optimizer": opt.state_dict(), "progress": state}, tmp)
        tmp.replace(checkpoint_path)  # atomic: a kill mid-write keeps the previous epoch's checkpoint
        tqdm.write(f"epoch {epoch}: loss {record['loss']:.4f} valid ndcg@10 {valid['ndcg_at_10']:.4f} "
                   f"hr@10 {valid['hr_at_10']:.4f} ({record['seconds']:.1f} s)", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(epoch, record)

    best = load(model_path, map_location=cfg.device)
    kwargs = {"max_len": cfg.max_len, "batch_size": cfg.eval_batch_size}
    return {"model": model, "config": dataclasses.asdict(best.config), "train": dataclasses.asdict(cfg),
            "epochs": state["epoch"], "best_epoch": state["best_epoch"],
            "valid": evaluate(best, data, "valid", **kwargs), "test": evaluate(best, data, "test", **kwargs),
            "history": state["history"], "model_path": str(model_path), "seconds": time.time() - began}
