"""Prepared data (DATA_DIR/prepared/*.parquet) as flat numpy arrays, and the windows models train and rank on.

Sequences are ragged, so they are kept as one flat item array plus offsets (CSR, like Arrow's list layout):
a million users cost two arrays, and every batch is one vectorised gather. Models read right-padded
windows: the real items first, then zeros.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

NO_TARGET = -100  # the target of a position that takes no loss: F.cross_entropy's default ignore_index
# similar_length_batches sorts pools of this many batches: more would sort better but mix the epoch less
LENGTH_POOL_BATCHES = 16

@dataclass(frozen=True)
class Sequences:
    flat: np.ndarray  # (total,) int64 item ids, user after user
    offsets: np.ndarray  # (U + 1,) int64; user u owns flat[offsets[u]:offsets[u + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def append(self, last: np.ndarray) -> "Sequences":
        """Each sequence with one more item at its end (history + valid item = the test input)."""
        flat = np.insert(self.flat, self.offsets[1:], last)
        return Sequences(flat, self.offsets + np.arange(len(self.offsets)))

    def last(self, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) of the last `max_len` items of the given users."""
        stop = self.offsets[rows + 1]
        return np.maximum(self.offsets[rows], stop - max_len), stop

    def remap(self, lut: np.ndarray) -> "Sequences":
        """Items re-indexed through lut (`vocabulary_lut`); the items it maps to 0 are dropped."""
        flat = lut[self.flat]
        kept = np.concatenate([[0], np.cumsum(flat > 0)])  # kept items before each flat position
        return Sequences(flat[flat > 0], kept[self.offsets])


def ids_by_index(path: Path, idx_col: str = "item_idx", id_col: str = "item_id") -> np.ndarray:
    """Raw id (str) of each dense index in a prepared items.parquet (or users.parquet), indexed by it; the item
    table's index 0 is padding."""
    table = pq.read_table(path, columns=[idx_col, id_col])
    idx = table.column(idx_col).to_numpy().astype(np.int64)
    ids = np.empty(int(idx.max(initial=-1)) + 1, dtype=object)
    ids[idx] = np.asarray(table.column(id_col).to_pylist(), dtype=object).astype(str)
    return ids


def vocabulary_lut(ids: np.ndarray, into: np.ndarray) -> np.ndarray:
    """(len(ids),) int64: for each dense index of one vocabulary, the index of the same raw id in another
    (`ids_by_index` arrays), 0 where the other lacks it; index 0 (padding) maps to 0."""
    position = {item: idx for idx, item in enumerate(into) if idx}
    return np.array([0] + [position.get(item, 0) for item in ids[1:]], dtype=np.int64)


@dataclass(frozen=True)
class Prepared:
    n_items: int
    history: Sequences  # all but the last two events of each user
    valid_item: np.ndarray  # (U,) int64
    test_item: np.ndarray  # (U,) int64

    @property
    def n_users(self) -> int:
        return len(self.valid_item)

    def split(self, split: str) -> tuple[Sequences, np.ndarray]:
        """Leave-one-out inputs and targets: valid = history -> valid item, test = history + valid -> test."""
        if split == "valid":
            return self.history, self.valid_item
        if split == "test":
            return self.history.append(self.valid_item), self.test_item
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def fingerprint(self) -> str:
        """Digest of the items, sequences and split: equal for the same prepared data, whatever its files' bytes."""
        h = hashlib.sha256(str(self.n_items).encode())
        for part in (self.history.flat, self.history.offsets, self.valid_item, self.test_item):
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def item_counts(self) -> np.ndarray:
        """(n_items + 1,) training-history count of each item; index 0 (padding) is 0."""
        return np.bincount(self.history.flat, minlength=self.n_items + 1)


def load_prepared(prepared_dir: Path) -> Prepared:
    """Read sequences.parquet and items.parquet (the contract in the README) with pyarrow only."""
    prepared_dir = Path(prepared_dir)
    seq_path, items_path = prepared_dir / "sequences.parquet", prepared_dir / "items.parquet"
    for path in (seq_path, items_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `recblr prepare` first")
    table = pq.read_table(seq_path, columns=["user_idx", "history", "valid_item", "test_item"])
    table = table.sort_by("user_idx")
    history = table.column("history").combine_chunks()
    if isinstance(history, pa.ChunkedArray):  # an empty table has no chunks
        history = pa.array([], type=pa.list_(pa.int32()))
    offsets = history.offsets.to_numpy().astype(np.int64)
    flat = history.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    n_items = pq.read_metadata(items_path).num_rows
    valid = table.column("valid_item").to_numpy().astype(np.int64)
    test = table.column("test_item").to_numpy().astype(np.int64)
    for name, values in (("history", flat), ("valid_item", valid), ("test_item", test)):
        if values.size and (values.min() < 1 or values.max() > n_items):
            raise ValueError(f"{seq_path}: {name} holds item ids outside 1..{n_items} (items.parquet rows)")
    return Prepared(n_items, Sequences(flat, offsets - offsets[0]), valid, test)


def gather(flat: np.ndarray, start: np.ndarray, stop: np.ndarray) -> torch.Tensor:
    """flat[start[b]:stop[b]] for each b, right-padded with 0 -> LongTensor (B, max length, at least 1)."""
    lengths = stop - start
    return _padded_windows(torch.from_numpy(flat), torch.from_numpy(start), torch.from_numpy(lengths),
                           max(int(lengths.max(initial=0)), 1))


def _padded_windows(flat: torch.Tensor, first: torch.Tensor, length: torch.Tensor, width: int) -> torch.Tensor:
    """flat[first[b]:first[b] + length[b]] for each b, right-padded with 0 to width: (B, width) int64, where
    flat is."""
    if len(flat) == 0:
        return torch.zeros(len(first), width, dtype=torch.long, device=flat.device)
    cols = torch.arange(width, device=flat.device)
    at = (first[:, None] + cols).clamp_(max=len(flat) - 1)  # (B, width), clipped where padded
    return torch.where(cols < length[:, None], flat[at], 0).long()


def _ragged(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, index within it) of every element when group g holds counts[g] elements, group after group, where
    counts is. total, the sum of counts, comes from the caller: on a GPU, reading it back would wait for the GPU."""
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    return group, torch.arange(total, device=counts.device) - (counts.cumsum(0) - counts)[group]


def training_batch(flat: torch.Tensor, start: np.ndarray, stop: np.ndarray,
                   regime: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of training windows as the loss reads it: (items (B, T) right-padded, positions (n,), targets (n,)),
    int64, made on flat's device.

    positions index the flattened (B * T) inputs where a loss is taken, row by row: every real position for
    "all", the last of each window for "prefix"; targets are the items that follow them. flat (`training_flat`)
    already lives where the model trains, so a batch sends only its windows' starts and lengths there, and the
    shapes (T, n) come from those lengths on the host: the step never waits for the GPU (for the size of a mask),
    and the host builds no (B, T) array. Built on the host, a batch of 512 x 1,000 took 25 ms of an H100 machine's
    host, which then fell behind its GPU (benchmarks/RESULTS.md, "Training at scale", session 13).
    """
    lengths = stop - start
    width, n = max(int(lengths.max(initial=0)), 1), int(lengths.sum())
    windows = torch.from_numpy(np.stack([start, lengths]))  # (2, B)
    if flat.is_cuda:  # pinned, the copy is queued without waiting for the GPU's queue to drain
        windows = windows.pin_memory()
    first, length = windows.to(flat.device, non_blocking=True)  # (B,) each
    items = _padded_windows(flat, first, length, width)
    if regime == "prefix":
        return items, torch.arange(len(start), device=flat.device) * width + length - 1, flat[first + length].long()
    if regime == "all":
        row, col = _ragged(length, n)  # of every real position
        return items, row * width + col, flat[first[row] + col + 1].long()
    raise ValueError(f"regime must be 'prefix' or 'all', got {regime!r}")


def padded_batch(flat: torch.Tensor, first: torch.Tensor, length: torch.Tensor, width: int, regime: str,
                 capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`training_batch` at shapes that depend only on (B, width, capacity): what a step replayed from a CUDA graph
    reads.

    first, length (B,): the windows, on flat's device; a row of length 0 (a short last batch's filler) takes no
    loss. items are (B, width) whatever the lengths. "all" lists its loss positions row by row as training_batch
    does, in `capacity` slots (at least the batch's count), the slots past them with target NO_TARGET; "prefix"
    takes one a row.
    """
    items, last = _padded_windows(flat, first, length, width), len(flat) - 1
    if regime == "prefix":
        rows = torch.arange(len(first), device=flat.device)
        targets = torch.where(length > 0, flat[(first + length).clamp(max=last)].long(), NO_TARGET)
        return items, rows * width + (length - 1).clamp(min=0), targets
    if regime == "all":
        ends = length.cumsum(0)  # (B,): where each row's positions end among the slots
        slot = torch.arange(capacity, device=flat.device)
        row = torch.searchsorted(ends, slot, right=True).clamp_(max=len(first) - 1)
        col = slot - (ends - length)[row]
        real = slot < ends[-1]
        targets = torch.where(real, flat[(first[row] + col + 1).clamp(0, last)].long(), NO_TARGET)
        # a spare slot reads position `slot`: distinct, so the backward's index sum never queues thousands of slots
        # on one row (all at 0, T = 4096 batches took 150 ms longer)
        return items, torch.where(real, row * width + col, slot), targets
    raise ValueError(f"regime must be 'prefix' or 'all', got {regime!r}")


def training_flat(history: Sequences, device) -> torch.Tensor:
    """history.flat on the device that trains, once per run, as int32 (ids fit; half the bytes of int64)."""
    return torch.from_numpy(history.flat.astype(np.int32)).to(device)


def to_device(values, device) -> torch.Tensor:
    """A host array (numpy or CPU tensor) on `device`, copied non-blocking: evaluation's batches. From pageable
    memory the driver may still wait for the GPU's queue to drain before a large copy: a 10 MB training batch
    waited 20 ms behind SASRec's previous step (benchmarks/RESULTS.md, "Training at scale", session 13), which is
    why training sends only its windows' starts and lengths (`training_batch`)."""
    return torch.as_tensor(values).to(device, non_blocking=True)


def training_windows(history: Sequences, max_len: int, regime: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of every training input in flat; the targets are the items one step later.

    "prefix" (the paper's): one sample per training target, its last `max_len` items before it; the loss
    is at the last position. "all": one window per user, loss at every position; a history longer than
    max_len + 1 is cut from its end into windows of max_len targets, so every target is used once.
    """
    off, lengths = history.offsets[:-1], history.lengths
    if regime == "prefix":
        user = _ragged(torch.from_numpy(lengths), int(lengths.sum()))[0].numpy()
        target = np.arange(len(history.flat))
        keep = target > off[user]  # the first event of a user has nothing before it
        target, user = target[keep], user[keep]
        return np.maximum(off[user], target - max_len), target
    if regime == "all":
        n_windows = np.where(lengths >= 2, -(-(lengths - 1) // max_len), 0)
        # k: the window's index in its user's, from the end
        user, k = (t.numpy() for t in _ragged(torch.from_numpy(n_windows), int(n_windows.sum())))
        stop = off[user] + lengths[user] - 1 - k * max_len
        return np.maximum(off[user], stop - max_len), stop
    raise ValueError(f"regime must be 'prefix' or 'all', got {regime!r}")


def similar_length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                           rng: np.random.Generator) -> np.ndarray:
    """`order` rearranged so that each run of batch_size holds windows of similar length: a batch is padded to its
    longest, so sorted batches spend far less on padding (benchmarks/RESULTS.md, "Session 17").

    order is taken in pools of LENGTH_POOL_BATCHES batches, each pool sorted longest first (stably: equal lengths
    keep order's random order), cut into batches, and the full batches shuffled with rng. The one short batch, if
    any, stays last, so slicing the result by batch_size still yields whole batches.
    """
    pool = LENGTH_POOL_BATCHES * batch_size
    pools = np.split(order, range(pool, len(order), pool))
    ranked = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in pools])
    n_full = len(order) // batch_size
    full = ranked[:n_full * batch_size].reshape(n_full, batch_size)
    return np.concatenate([full[rng.permutation(n_full)].ravel(), ranked[n_full * batch_size:]])
