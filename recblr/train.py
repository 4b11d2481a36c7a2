"""Training: full-softmax cross-entropy over every item, AdamW (Adam when undecayed), early stopping on validation
NDCG@10.

The loss (recblr.loss) never holds the (positions, items) logits: it walks them a chunk of rows at a time.

Two regimes over the same windows (recblr.data.training_windows): the paper's "prefix" (every prefix of a
training sequence is a sample, loss at its last position) and "all" (one window per user, loss at every
position). An epoch's shuffle and dropout depend only on (seed, epoch) and each epoch ends with a checkpoint,
so a killed run restarted with resume=True replays the remaining epochs exactly.

Under `torchrun --nproc-per-node N` (WORLD_SIZE, RANK, LOCAL_RANK in the environment) the same code runs as
DDP: every rank draws the same permutation and takes a disjoint share of each global batch of `batch_size`,
and each rank's loss is its sum over the batch's global target count, so the averaged gradient is the
single-process one up to float rounding (dropout masks differ). Rank 0 alone evaluates, writes the
checkpoint and model.pt, and broadcasts the early-stopping state; the other ranks' fit returns None.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from recblr.data import (load_prepared, padded_batch, similar_length_batches, training_batch, training_flat,
                         training_windows)
from recblr.evaluate import PRECISIONS, evaluate, precision_context
from recblr.loss import linear_cross_entropy
from recblr.models import build, config_fields, load, resolve_device, save

LOSS_SHOWN_EVERY_S = 1.0  # the progress bar's loss and speed; more often would stall the GPU queue for it
# fields a resumed run may change: they alter neither the model nor what an epoch computes
RESUMABLE_CHANGES = {"epochs", "device", "eval_batch_size", "time_budget_s", "recompute", "cuda_graph"}
CAPTURE_AFTER = 3  # eager steps on a side stream before a CUDA graph is captured, the warm-up torch.cuda.graph asks
# under DDP, as PyTorch's CUDA graph notes ("Usage with DistributedDataParallel") ask: its reducer rebuilds its
# buckets and times itself with CUDA events in its first 10 iterations
DDP_CAPTURE_AFTER = 11
# a graph's loss slots grow in steps of this share of batch_size * max_len: spare slots cost loss work at every
# replay, a re-capture costs once (1/64 against 1/16: T = 4096 epochs 1.22 -> 1.17 s on an H100)
LOSS_SLOTS_STEP = 1 / 64
# a graphed step pads its windows to the least width that holds the batch's longest, of max_len divided by powers of
# this ratio down to about MIN_GRAPH_WIDTH: one graph a width, each padding at most ratio - 1 more than a batch needs
GRAPH_WIDTH_RATIO = 2 ** 0.5
MIN_GRAPH_WIDTH = 8
# past this many positions a rank's batch (batch_size / world x max_len) the GPU sets the pace, and a graph would only
# add padding: on an H100, at 512 x 1000 the eager step was 2-4% faster (6% with batch_by_length); at 512 x 500 the two
# were even (the graph 6% faster with batch_by_length); benchmarks/RESULTS.md, "Session 17". A recomputing step is
# graphed at any size: RecBLR's spans launch a block's kernels T / RECOMPUTE_SPAN times, and eagerly the host set the
# pace, 2.9x slower at 512 x 1000 ("Session 18"); SASRec's lost 4% to the padding
GRAPH_MAX_POSITIONS = 2 ** 18


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the recipe that was best on the validation split of Amazon Beauty (benchmarks/RESULTS.md).

    The paper's own recipe is regime="prefix", batch_size=2048, label_smoothing=0.0; on Beauty and Sports it
    reached the same validation NDCG@10 as "all" without smoothing, and smoothing 0.1 lifted both regimes.
    "all" is the default because an epoch reads each user once instead of once per event, which is what
    lets the default run finish on a CPU in minutes. lr 2e-3 lifted validation NDCG@10 over the paper's 1e-3 on
    every seed of Beauty and on Sports' mean; 3e-3 and 1.5e-3 did not.
    """
    epochs: Optional[int] = None  # None: 300 on a GPU (early stopping ends it first), 4 on a CPU
    batch_size: int = 256  # user windows ("all") or samples ("prefix") per step, summed over DDP ranks
    lr: float = 2e-3  # the paper: 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay of the matrices and the item table (the paper: none)
    label_smoothing: float = 0.1
    max_len: int = 50  # the paper: 50 for Beauty/Sports/Steam, 100 Gowalla, 200 ML-1M
    regime: str = "all"  # "all" (loss at every position) or "prefix" (the paper's)
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    seed: int = 42
    device: str = "auto"  # "auto": cuda when available
    eval_batch_size: int = 4096
    precision: str = "fp32"  # "bf16": autocast for training and evaluation (the kernel then reads bf16)
    time_budget_s: Optional[float] = None  # after the first epoch, none starts that would end past this
    compile: bool = False  # torch.compile the training forward: fewer, fused kernels for a compile at start
    recompute: bool = False  # keep each block's input only and re-run it (RecBLR, LRURec: a span) in the backward
    cuda_graph: bool = True  # on CUDA devices without compile, replay each step from a CUDA graph (DDP's too)
    batch_by_length: bool = False  # batches of windows of similar length (recblr.data.similar_length_batches)

    def __post_init__(self):
        if self.regime not in ("prefix", "all"):
            raise ValueError(f"TrainConfig: regime must be 'prefix' or 'all', got {self.regime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be 'fp32' or 'bf16', got {self.precision!r}")
        at_least_1 = {"epochs": 1 if self.epochs is None else self.epochs, "batch_size": self.batch_size,
                      "max_len": self.max_len, "patience": self.patience, "eval_batch_size": self.eval_batch_size}
        for name, value in at_least_1.items():
            if value < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {value}")
        if not (self.lr >= 0 and self.weight_decay >= 0 and 0 <= self.label_smoothing < 1):
            raise ValueError(f"TrainConfig: lr and weight_decay must be >= 0 and label_smoothing in [0, 1), got "
                             f"{self.lr}, {self.weight_decay} and {self.label_smoothing}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"TrainConfig: time_budget_s must be positive, got {self.time_budget_s}")

    def resolved(self) -> "TrainConfig":
        device = resolve_device(self.device)
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        epochs = self.epochs or (300 if device.startswith("cuda") else 4)
        return dataclasses.replace(self, device=device, epochs=epochs)


def flatten_settings(config, train) -> dict:
    """{"config.FIELD": value, "train.FIELD": value} of a model config and a TrainConfig (dataclasses or their
    dicts), the train fields that a resumed run may change left out."""
    as_dict = lambda d: d if isinstance(d, dict) else dataclasses.asdict(d)  # noqa: E731
    return {**{f"config.{k}": v for k, v in as_dict(config).items()},
            **{f"train.{k}": v for k, v in as_dict(train).items() if k not in RESUMABLE_CHANGES}}


def step_loss(net, items: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
              cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy summed over `targets`, taken at `positions` of the flattened (B * T) outputs for `items`."""
    model = getattr(net, "module", net)  # the item table lives on the model inside a DDP wrapper
    with precision_context(cfg.device, cfg.precision):
        hidden = net(items).flatten(0, 1)[positions]  # (n, D): only positions with a loss
        # model.scores' logits, a chunk of rows at a time: the (n, n_items + 1) matrix is never held
        return linear_cross_entropy(hidden, model.item_embedding.weight, targets, cfg.label_smoothing)


def batch_loss(net, flat: torch.Tensor, start: np.ndarray, stop: np.ndarray, cfg: TrainConfig,
               n_targets: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy summed over the batch's targets, divided by n_targets (default: their count, the mean); flat
    is `training_flat` on cfg.device. Nothing here waits for the GPU, so the host queues the next batch while this
    one runs."""
    items, positions, targets = training_batch(flat, start, stop, cfg.regime)
    loss = step_loss(net, items, positions, targets, cfg)
    return loss / (n_targets if n_targets is not None else max(len(positions), 1))


def epoch_order(lengths: np.ndarray, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` takes the windows of these lengths, batch_size at a time: a permutation drawn
    from (seed, epoch) alone, so a resumed run replays it; with cfg.batch_by_length, rearranged into batches of
    similar lengths."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(lengths))
    return similar_length_batches(order, lengths, cfg.batch_size, rng) if cfg.batch_by_length else order


def shard(start: np.ndarray, stop: np.ndarray, cfg: TrainConfig, rank: int, world: int,
          count: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """This rank's windows of a global batch's (start, stop), and the divisor that makes the ranks' mean loss the
    batch's mean, or the batch's sum over `count` when given.

    DDP averages gradients over ranks, so each rank divides its sum by (global target count / world).
    A last batch smaller than the world leaves some ranks empty: they run one window at zero weight, so
    every rank still joins each gradient all-reduce.
    """
    if count is None:
        count = len(start) if cfg.regime == "prefix" else int((stop - start).sum())
    if rank >= len(start):
        return start[:1], stop[:1], float("inf")
    return start[rank::world], stop[rank::world], count / world


def rows_per_rank(cfg: TrainConfig, world: int) -> int:
    """The most windows a rank's `shard` of a global batch holds."""
    return -(-cfg.batch_size // world)


class EagerStep:
    """A training step as PyTorch issues it, op by op: a global batch's windows (start, stop) -> the batch's loss,
    detached, after the optimizer's step. This rank trains on its `shard` of the batch; the summed loss is divided by
    `count` when given, else by the batch's number of targets (its mean). Shapes follow each batch: windows padded to
    the longest of the rank's share, the loss at the real targets only."""

    def __init__(self, net, opt: torch.optim.Optimizer, flat: torch.Tensor, cfg: TrainConfig, rank: int = 0,
                 world: int = 1):
        self.net, self.opt, self.flat, self.cfg, self.rank, self.world = net, opt, flat, cfg, rank, world

    def __call__(self, start: np.ndarray, stop: np.ndarray, count: Optional[float] = None) -> torch.Tensor:
        start, stop, divisor = shard(start, stop, self.cfg, self.rank, self.world, count)
        loss = batch_loss(self.net, self.flat, start, stop, self.cfg, divisor)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class GraphedStep(EagerStep):
    """The same step replayed from CUDA graphs: a launch a step instead of several hundred.

    At short lengths the host took 2-7 times as long to issue a step as the GPU to run it (benchmarks/RESULTS.md,
    "Session 14: training steps replayed from a CUDA graph"). A graph fixes every shape, so each rank's share is read
    as `padded_batch`: windows padded to (rows, width), rows a rank's share of batch_size, width the least of
    `graph_widths` that holds the batch's longest, and in "all" the loss positions in a fixed number of slots, a little
    more than the largest share's count. Each width has a graph of its own; they never run at once, so they share one
    memory pool. A batch with more positions than its width's slots is captured anew with more. The batch sends only
    its windows' starts and lengths.
    The first CAPTURE_AFTER steps (DDP_CAPTURE_AFTER under DDP), and the first step at each width, run eagerly on a
    side stream; they are training steps too. The next at that width is captured, then replayed with every later
    batch of that width. Under DDP the graphs hold the gradients' all-reduce; NCCL lets a rank replay a captured
    collective only where every rank replays the graph of the same capture, so widths and slots follow the whole
    batch, never one rank's share. Dropout draws from the CUDA generator, which each replay advances, so
    `torch.manual_seed` still decides the masks, and an eager step draws the masks a replay of it would.
    """

    def __init__(self, net, opt: torch.optim.Optimizer, flat: torch.Tensor, cfg: TrainConfig, rank: int = 0,
                 world: int = 1):
        super().__init__(net, opt, flat, cfg, rank, world)
        self.rows = rows_per_rank(cfg, world)
        self.windows = torch.zeros(2, self.rows, dtype=torch.long, device=cfg.device)  # first, length
        self.divisor = torch.ones((), device=cfg.device)
        self.side = torch.cuda.Stream(cfg.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.widths = graph_widths(cfg.max_len)
        self.graphs: dict[int, tuple] = {}  # width -> its graph, the graph's loss, the graph's slots
        self.slots: dict[int, int] = {}  # width -> the loss slots its next graph or eager step gets
        self.eager_steps = 0

    def _step(self, width: int) -> torch.Tensor:
        first, length = self.windows
        batch = padded_batch(self.flat, first, length, width, self.cfg.regime, self.slots[width])
        loss = step_loss(self.net, *batch, self.cfg) / self.divisor
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, start: np.ndarray, stop: np.ndarray, count: Optional[float] = None) -> torch.Tensor:
        shares = [shard(start, stop, self.cfg, rank, self.world, count) for rank in range(self.world)]
        mine_start, mine_stop, divisor = shares[self.rank]
        windows = np.zeros((2, self.rows), dtype=np.int64)  # rows past a short share: length 0, no loss
        windows[0, :len(mine_start)], windows[1, :len(mine_start)] = mine_start, mine_stop - mine_start
        self.windows.copy_(torch.from_numpy(windows).pin_memory(), non_blocking=True)
        self.divisor.fill_(divisor)
        width = int(self.widths[np.searchsorted(self.widths, (stop - start).max())])
        # "prefix": one loss a row
        positions = max(int((b - a).sum()) for a, b, _ in shares) if self.cfg.regime == "all" else self.rows
        first_at_width = width not in self.slots
        if positions > self.slots.get(width, 0):  # padding costs the loss: slots follow the batches seen, plus a margin
            full = self.rows * width
            step = max(1, int(full * LOSS_SLOTS_STEP))
            self.slots[width] = min(full, (positions // step + 2) * step)
        graph, loss, slots = self.graphs.get(width, (None, None, 0))
        if slots < self.slots[width]:  # no graph for this width yet, or one with too few slots
            warm_up = CAPTURE_AFTER if self.world == 1 else DDP_CAPTURE_AFTER
            if self.eager_steps < warm_up or first_at_width:  # a new width's kernels compile outside a capture
                self.eager_steps += 1
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    self.opt.zero_grad(set_to_none=True)
                    loss = self._step(width)
                torch.cuda.current_stream().wait_stream(self.side)
                return loss
            # an old graph is dropped only once the new one is made: the shared pool dies with its last graph
            self.opt.zero_grad(set_to_none=True)  # the graph's backward makes the gradients; each replay rewrites them
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._step(width)
            self.graphs[width] = graph, loss, self.slots[width]
        graph.replay()
        return loss


def graph_widths(max_len: int) -> np.ndarray:
    """The window widths a graphed step pads to, ascending: max_len / GRAPH_WIDTH_RATIO**k, rounded up, for k = 0, 1,
    ... until one is MIN_GRAPH_WIDTH or less."""
    n = int(np.ceil(np.log(max(max_len / MIN_GRAPH_WIDTH, 1)) / np.log(GRAPH_WIDTH_RATIO)))
    return np.unique(np.ceil(max_len / GRAPH_WIDTH_RATIO ** np.arange(n + 1)).astype(np.int64))


def graphs_steps(cfg: TrainConfig, world: int = 1) -> bool:
    """Whether training steps replay from CUDA graphs: on CUDA devices (cfg.cuda_graph) for a rank's batches of up to
    GRAPH_MAX_POSITIONS positions or when recomputing; else they run eagerly (on the CPU, compiled or long windows)."""
    return (cfg.cuda_graph and cfg.device.startswith("cuda") and not cfg.compile
            and (cfg.recompute or rows_per_rank(cfg, world) * cfg.max_len <= GRAPH_MAX_POSITIONS))


def training_step(net, opt: torch.optim.Optimizer, flat: torch.Tensor, cfg: TrainConfig, rank: int = 0,
                  world: int = 1) -> EagerStep:
    """The step `train_epoch` runs on this rank, graphed where `graphs_steps` says. `net` is what `stepped` returns."""
    return (GraphedStep if graphs_steps(cfg, world) else EagerStep)(net, opt, flat, cfg, rank, world)


def train_epoch(step: EagerStep, start: np.ndarray, stop: np.ndarray, order: np.ndarray, cfg: TrainConfig, *,
                desc: str = "train") -> float:
    """One pass over `order` (indices into start/stop) in global batches of cfg.batch_size; the mean loss.

    Batches of similar lengths (cfg.batch_by_length) hold unequal numbers of targets in "all": each batch's sum is
    divided by the epoch's mean count instead of its own, so every target weighs what it weighs in random batches,
    instead of the few targets of short windows outweighing the many of long ones.
    """
    step.net.train()
    began, shown, n = time.time(), 0.0, 0
    per_batch = None
    if cfg.batch_by_length and cfg.regime == "all":
        per_batch = float((stop[order] - start[order]).sum()) / max(-(-len(order) // cfg.batch_size), 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=cfg.device)  # summed where it is made: no sync a step
    bar = tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch", disable=step.rank != 0)
    for n, lo in enumerate(bar, 1):
        batch = order[lo:lo + cfg.batch_size]
        loss_sum += step(start[batch], stop[batch], per_batch)
        if step.rank == 0 and time.time() - shown >= LOSS_SHOWN_EVERY_S:  # reading the loss waits for the GPU
            shown = time.time()
            bar.set_postfix(loss=f"{loss_sum.item() / n:.4f}", seq_s=f"{(lo + len(batch)) / (shown - began):.0f}")
    if step.world > 1:  # the batch mean is the mean of the ranks' losses (see shard)
        dist.all_reduce(loss_sum)
        loss_sum /= step.world
    return loss_sum.item() / max(n, 1)


def stepped(net: torch.nn.Module, cfg: TrainConfig, world: int = 1) -> torch.nn.Module:
    """What training steps: `net` wrapped in DDP across ranks (it broadcasts rank 0's weights now and
    all-reduces gradients in backward), and compiled when cfg.compile; `net` recomputes its blocks in the
    backward when cfg.recompute, in spans sized for how the step is issued (`graphs_steps`)."""
    if cfg.recompute and not net.supports_recompute:
        raise ValueError(f"TrainConfig: recompute needs a model made of blocks (recblr, sasrec, lrurec), "
                         f"not {type(net).__name__}")
    net.recompute, net.graphed = cfg.recompute, graphs_steps(cfg, world)
    if world > 1 and cfg.device.startswith("cuda"):
        # built on a side stream, as PyTorch's CUDA graph notes ask, so that a graph can capture its gradient hooks
        side = torch.cuda.Stream(cfg.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            net = DistributedDataParallel(net, device_ids=[torch.device(cfg.device).index])
        torch.cuda.current_stream().wait_stream(side)
        # DDP times itself with CUDA events in its first 10 iterations and every 100th after. Captures come after the
        # first DDP_CAPTURE_AFTER, but a new width's may fall on any later one, so the sampling is turned off rather
        # than trusted inside a capture
        net._set_ddp_runtime_logging_sample_rate(2 ** 31 - 1)
    elif world > 1:
        net = DistributedDataParallel(net)
    if not cfg.compile:
        return net
    # dynamic=True would also make Python floats (dropout's p) graph inputs, which the subgraph of a checkpointed
    # RecBLR span cannot take ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer", torch
    # 2.11 and 2.13); they are constants of the model, so they are specialised
    torch._dynamo.config.specialize_float = True
    # dynamic: one graph serves every window length a batch pads to, instead of a compile per length
    return torch.compile(net, dynamic=True)


def fit(prepared_dir: Path, run_dir: Path, model: str = "recblr", *, overrides: Optional[dict] = None,
        train: Optional[TrainConfig] = None, resume: bool = False,
        on_epoch: Optional[Callable[[int, dict], None]] = None) -> Optional[dict]:
    """Train `model` on prepared_dir; run_dir gets checkpoint.pt (latest) and model.pt (best validation).

    Returns {"model", "config", "train", "epochs", "best_epoch", "stopped" (why training ended: "early stopping",
    "epoch cap", "time budget" or "diverged": a NaN loss after the best epoch), "valid", "test", "history",
    "model_path", "seconds"} (None on DDP ranks other than 0); on_epoch(epoch, record) is called on rank 0 after each epoch's checkpoint is written.
    """
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cfg = (train or TrainConfig()).resolved()
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    result = _fit(prepared_dir, run_dir, model, overrides, cfg, resume, on_epoch, rank, world)
    # not on an error: its traceback keeps the step's CUDA graphs alive, and NCCL hangs destroying a communicator
    # that live graphs captured; the failing rank exits, and torchrun stops the others
    if owns_group:
        dist.destroy_process_group()
    return result


class OutOfGPUMemory(RuntimeError):
    """torch.OutOfMemoryError, saying what ran out and which settings need less memory."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite before any epoch was validated, so there is no model to keep."""


@contextlib.contextmanager
def memory_advice(cfg: TrainConfig, during: str, tries: list[str]):
    """Re-raise a torch.OutOfMemoryError inside as OutOfGPUMemory: what ran `during` it, the device's peak, `tries`."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        used = ""
        if cfg.device.startswith("cuda"):
            device = torch.device(cfg.device)
            used = (f" ({torch.cuda.max_memory_allocated(device) / 2**30:.1f} of "
                    f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GB allocated at the peak)")
        raise OutOfGPUMemory(f"{cfg.device} ran out of memory during {during}{used}; try "
                             + ", or ".join(tries)) from err


def memory_savers(net: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """The training settings that need less memory than cfg's, the largest saving first."""
    savers = []
    if net.supports_recompute and not cfg.recompute:
        savers.append("--recompute (RecBLR at T = 1000: 0.19x the memory for 1.8x the time)")
    if cfg.precision == "fp32":
        savers.append("--precision bf16")
    if not cfg.batch_by_length:
        savers.append("--batch-by-length (less padding)")
    return savers + [f"a smaller --batch-size (now {cfg.batch_size}) or --max-len (now {cfg.max_len})"]


def optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, decaying only tensors of two or more dimensions (as nanoGPT): biases, LayerNorm and the
    per-channel decay rates Lambda keep their scale. With weight_decay 0 it is the paper's Adam."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # capturable: the step count stays on the device, so a CUDA graph can hold the optimizer's step
    return torch.optim.AdamW(groups, lr=cfg.lr, capturable=cfg.device.startswith("cuda"))


def _fit(prepared_dir, run_dir, model, overrides, cfg, resume, on_epoch, rank, world):
    began = time.time()
    run_dir, data = Path(run_dir), load_prepared(prepared_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path = run_dir / "checkpoint.pt", run_dir / "model.pt"
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the scores matmul dominates; TF32 is ample for ranking
    torch.manual_seed(cfg.seed)
    if "max_len" in config_fields(model):  # SASRec's position table spans the training windows unless set otherwise
        overrides = {"max_len": cfg.max_len, **(overrides or {})}
    net = build(model, data.n_items, **(overrides or {}))
    if hasattr(net, "fit_counts"):  # the popularity baseline reads its table from the training histories
        net.fit_counts(data.item_counts())
    net = net.to(cfg.device)
    opt = optimizer(net, cfg)
    state = {"epoch": 0, "history": [], "best_ndcg": -1.0, "best_epoch": 0, "stale": 0, "out_of_time": False}
    fingerprint = data.fingerprint()  # a checkpoint resumes on the data it was trained on only
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"{checkpoint_path}: nothing to resume; train without --resume first")
        blob = torch.load(checkpoint_path, map_location=cfg.device, weights_only=True)
        mine = {"model": model, "data": fingerprint, **flatten_settings(net.config, cfg)}
        theirs = {"model": blob["model"], "data": blob.get("data", mine["data"]),  # older checkpoints: no digest
                  **flatten_settings(blob["config"], blob["train"])}
        changed = [f"{key} {theirs.get(key)!r} -> {mine.get(key)!r}" for key in sorted(set(mine) | set(theirs))
                   if mine.get(key) != theirs.get(key)]
        if changed:
            raise ValueError(f"{checkpoint_path}: saved with other settings or data; changed: {', '.join(changed)}"
                             f" (resumable changes: {', '.join(sorted(RESUMABLE_CHANGES))})")
        net.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        state = {**blob["progress"], "out_of_time": False}  # a resumed run has a budget of its own
    trained = stepped(net, cfg, world)  # evaluation uses `net`

    start, stop = training_windows(data.history, cfg.max_len, cfg.regime)
    if len(start) == 0:
        raise ValueError(f"{prepared_dir}: no training sequence has two events; nothing to learn from")
    step = training_step(trained, opt, training_flat(data.history, cfg.device), cfg, rank, world)
    train_savers = memory_savers(net, cfg)
    eval_savers = [f"a smaller --eval-batch-size (now {cfg.eval_batch_size} users a chunk)"]
    diverged = False
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stale"] >= cfg.patience or state["out_of_time"]:
            break
        torch.manual_seed((cfg.seed + epoch) * world + rank)  # one process: seed + epoch, as before DDP
        order = epoch_order(stop - start, cfg, epoch)
        epoch_began = time.time()
        with memory_advice(cfg, f"training epoch {epoch}, batches of {cfg.batch_size} windows of up to "
                                f"{cfg.max_len}", train_savers):
            loss = train_epoch(step, start, stop, order, cfg, desc=f"epoch {epoch}/{cfg.epochs}")
        train_seconds = time.time() - epoch_began
        if not np.isfinite(loss):  # every rank sees the reduced loss, so all stop here together
            advice = f"try a lower --lr (now {cfg.lr})" + (" or --precision fp32" if cfg.precision != "fp32" else "")
            if state["best_epoch"] == 0:
                raise TrainingDiverged(f"epoch {epoch}: the training loss is {loss}, no epoch to keep; {advice}")
            # the weights are NaN from here on: more epochs would only run out the patience
            diverged = True
            if rank == 0:
                tqdm.write(f"epoch {epoch}: the training loss is {loss}: training diverged; keeping epoch "
                           f"{state['best_epoch']}, the best before it; {advice}", file=sys.stderr)
            break
        if rank == 0:
            with precision_context(cfg.device, cfg.precision), memory_advice(cfg, "validation", eval_savers):
                valid = evaluate(net, data, "valid", max_len=cfg.max_len, batch_size=cfg.eval_batch_size)
            record = {"epoch": epoch, "loss": loss, "seconds": time.time() - epoch_began,
                      "train_seconds": train_seconds, **{f"val_{k}": v for k, v in valid.items()}}
            state["history"].append(record)
            state["epoch"] = epoch
            if valid["ndcg_at_10"] > state["best_ndcg"]:
                state.update(best_ndcg=valid["ndcg_at_10"], best_epoch=epoch, stale=0)
                save(net, model_path, train=dataclasses.asdict(cfg), epoch=epoch)
            else:
                state["stale"] += 1
            tmp = checkpoint_path.with_suffix(".pt.tmp")
            torch.save({"model": model, "config": dataclasses.asdict(net.config), "train": dataclasses.asdict(cfg),
                        "data": fingerprint, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
                        "progress": state}, tmp)
            tmp.replace(checkpoint_path)  # atomic: a kill mid-write keeps the previous epoch's checkpoint
            tqdm.write(f"epoch {epoch}: loss {loss:.4f} valid ndcg@10 {valid['ndcg_at_10']:.4f} "
                       f"hr@10 {valid['hr_at_10']:.4f} ({train_seconds:.1f} s train, {record['seconds']:.1f} s)",
                       file=sys.stderr)
            if on_epoch is not None:
                on_epoch(epoch, record)
            # decided on rank 0 and broadcast with the rest of the state: the ranks' clocks differ
            state["out_of_time"] = cfg.time_budget_s is not None and (
                time.time() - began + record["seconds"] > cfg.time_budget_s)
        if world > 1:  # every rank stops on rank 0's decision
            shared = [state]
            dist.broadcast_object_list(shared, src=0)
            state = shared[0]

    if rank != 0:
        return None
    best = load(model_path, map_location=cfg.device)
    kwargs = {"max_len": cfg.max_len, "batch_size": cfg.eval_batch_size}
    with precision_context(cfg.device, cfg.precision), memory_advice(cfg, "the final evaluation", eval_savers):
        valid, test = (evaluate(best, data, split, **kwargs) for split in ("valid", "test"))
    stopped = ("diverged" if diverged else "early stopping" if state["stale"] >= cfg.patience else
               "time budget" if state["out_of_time"] and state["epoch"] < cfg.epochs else "epoch cap")
    return {"model": model, "config": dataclasses.asdict(best.config), "train": dataclasses.asdict(cfg),
            "epochs": state["epoch"], "best_epoch": state["best_epoch"], "stopped": stopped, "valid": valid,
            "test": test, "history": state["history"], "model_path": str(model_path), "seconds": time.time() - began}
