"""Online serving of a recurrent recommender: a fixed batch of user slots, advanced one event per call.

`StepServer(model, batch_size, k)` keeps the cached state of `batch_size` users ("slots") in tensors that
`model.allocate_state` makes once; `step(items)` advances every slot by one event and returns each slot's top-k
next items. On CUDA the whole step (the model's step, which writes the active slots' state in place, and
`model.top_k`, the fused score + top-k kernel, which writes their top-k in place) is captured once in a CUDA graph
and replayed; on CUDA each RecBLR block steps in one launch (`kernels.block_step`). On an H100
(benchmarks/RESULTS.md, "Inference", sessions 12 and 13) 1,024 users step in 0.11 ms with 3,416 items and 0.59-0.63
ms with 100k, one user in 0.07-0.08 ms. On a CPU, or when capture fails, the same `_step` runs eagerly: the graph only
replays it.

    server = StepServer(model, batch_size=64, k=10)   # RecBLR, GRU4Rec or LRURec, on the device it serves on
    server.prefill([0, 1], [[5, 9, 2], [7]])           # two users' past events (oldest first) into slots 0 and 1
    items = torch.zeros(64, dtype=torch.long)
    items[:2] = torch.tensor([3, 8])                   # their new events
    top, scores = server.step(items, active=items > 0)  # (64, 10) each; rows 0 and 1 are their top-10 now
    server.reset([1])                                  # user 1 left: slot 1 is empty again
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn


def leaves(state) -> list[torch.Tensor]:
    """The tensors of a state as `allocate_state` returns it (a tensor, or lists / tuples of them), in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [leaf for part in state for leaf in leaves(part)]


def _integers(name: str, values) -> torch.Tensor:
    """`values` (a tensor, an array or a list of ints) as a tensor, refused when its dtype is float, complex or bool:
    casting would turn 1.7 into 1 without a word. Empty passes whatever its dtype, as torch makes [] float."""
    values = torch.as_tensor(values)
    if values.numel() and (values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool):
        raise ValueError(f"{name} must be integers (an integer tensor or array, or a list of ints), "
                         f"got {values.dtype}")
    return values


class StepServer:
    """The cached state of `batch_size` users of a recurrent `model`, stepped together.

    model: a recurrent `SequentialRecommender`, with `allocate_state(batch_size, device)` and `step(items (B,),
    state, active) -> hidden`, advancing the state in place (RecBLR, GRU4Rec, LRURec), ranked by its `top_k`; it is
    put in eval mode and served on the device of its parameters. Its weights are read in place, so
    `load_state_dict` updates a captured graph too. `cuda_graph=False` steps eagerly on CUDA as well.
    `capture_error` says why capture failed (also warned once), None otherwise. Slots and item ids, wherever
    given, are integers: an integer tensor or array, or a list of ints; floats are refused, not truncated.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, batch_size: int, k: int = 10, cuda_graph: bool = True):
        if not (callable(getattr(model, "allocate_state", None)) and callable(getattr(model, "step", None))):
            raise ValueError(f"{type(model).__name__} is not a recurrent model: serving needs "
                             f"allocate_state(batch_size, device) and step(items, state, active)")
        n_items = model.item_embedding.num_embeddings - 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 1 <= k <= n_items:
            raise ValueError(f"k must be in 1..{n_items} (the model's item count), got {k}")
        self.model = model.eval()  # dropout off; a graph would also freeze whichever mode it was captured in
        self.batch_size, self.k, self.n_items = batch_size, k, n_items
        self.device = next(model.parameters()).device
        # the batch dim of each state tensor is the one that grows with batch_size (RecBLR's 0, GRU4Rec's 1)
        one, two = (leaves(model.allocate_state(n, "meta")) for n in (1, 2))
        self.batch_dims = [next(d for d in range(a.dim()) if a.shape[d] != b.shape[d]) for a, b in zip(one, two)]
        # static buffers: the step reads and writes these, so a captured graph replays on whatever they hold
        self.state = model.allocate_state(batch_size, self.device)
        self.items = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)
        self.active = torch.ones(batch_size, dtype=torch.bool, device=self.device)  # (B,)
        self._all_active = True  # what self.active holds, known on the host
        self.top_items = torch.zeros(batch_size, k, dtype=torch.long, device=self.device)  # (B, k)
        self.top_scores = torch.full((batch_size, k), float("-inf"), device=self.device)  # (B, k)
        self.graph, self.capture_error = None, None
        if cuda_graph and self.device.type == "cuda":
            self.graph = self._capture()
            self.reset()  # the warm-up steps moved the state

    def _batch_first(self, state) -> list[torch.Tensor]:
        """Views of each state tensor with the slots as dim 0."""
        return [leaf.movedim(d, 0) for leaf, d in zip(leaves(state), self.batch_dims)]

    def _step(self) -> None:
        """The whole step on the static buffers: what runs eagerly and what the graph captures. Only the active
        slots' state and top-k are written; a slot that did not advance keeps both."""
        hidden = self.model.step(self.items, self.state, self.active)  # (B, D)
        self.model.top_k(hidden, self.k, out=(self.top_items, self.top_scores), active=self.active)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """`_step` in a CUDA graph, or None with a warning when capture fails."""
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # Triton compiles on the first calls, which capture cannot record
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._step()
            except RuntimeError as err:
                self.capture_error = f"{type(err).__name__}: {err}"
                warnings.warn(f"StepServer: CUDA graph capture failed, stepping eagerly ({self.capture_error})",
                              RuntimeWarning)
                return None
        return graph

    @torch.inference_mode()
    def step(self, items, active=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance every slot by one event: items (batch_size,) ids in 0..n_items, on any device.

        active (batch_size,) bool: only these slots advance (default all); the others keep their state and
        their previous top-k, and their items are ignored. Returns (items (batch_size, k), scores
        (batch_size, k)), best first, never item 0: the server's own output buffers, overwritten by the next
        step, so copy what you keep. A slot not stepped since prefill / reset has items 0 and scores -inf.
        Ids given on the host are range-checked; on the device that would cost a synchronize per step.
        """
        if self.model.training:
            raise RuntimeError("StepServer: the model was put back in train mode; call model.eval()")
        items = _integers("items", items)
        if items.shape != (self.batch_size,):
            raise ValueError(f"items must be of shape ({self.batch_size},), got {tuple(items.shape)}")
        if items.device.type == "cpu" and not 0 <= items.min() <= items.max() <= self.n_items:
            raise ValueError(f"item ids must be in 0..{self.n_items}, got {items.min()}..{items.max()}")
        if active is None:
            if not self._all_active:  # a launch saved on every step of the common case
                self.active.fill_(True)
                self._all_active = True
        else:
            active = torch.as_tensor(active)
            if active.shape != (self.batch_size,) or active.dtype != torch.bool:
                raise ValueError(f"active must be a bool mask of shape ({self.batch_size},), "
                                 f"got {active.dtype} {tuple(active.shape)}")
            self.active.copy_(active)
            self._all_active = False
        self.items.copy_(items)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.top_items, self.top_scores

    def _check_slots(self, slots) -> torch.Tensor:
        slots = _integers("slots", slots).long()
        if slots.dim() != 1 or len(slots.unique()) != len(slots):
            raise ValueError(f"slots must be a 1-d list of distinct slot numbers, got {slots.tolist()}")
        if len(slots) and not 0 <= slots.min() <= slots.max() < self.batch_size:
            raise ValueError(f"slots must be in 0..{self.batch_size - 1}, got {slots.tolist()}")
        return slots.to(self.device)

    @torch.inference_mode()
    def reset(self, slots=None) -> None:
        """Empty the given slots (default all): state as before any event, no top-k yet (items 0, scores -inf)."""
        slots = self._check_slots(range(self.batch_size) if slots is None else slots)
        for view in self._batch_first(self.state):
            view[slots] = 0
        self.top_items[slots] = 0
        self.top_scores[slots] = float("-inf")

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], histories: Sequence) -> None:
        """Load users' past events into slots: histories[j] (1-d item ids in 1..n_items, oldest first, no
        padding) replaces slot slots[j]'s state, exactly as stepping every event would; [] empties the slot.

        Histories of equal length go through one parallel `model.prefill` (models without one, such as GRU4Rec,
        step through the events instead), so the cost is one forward per distinct length: bucket lengths
        upstream if a batch has many. For a user's top-k, prefill all but the newest event and `step` that one.
        """
        slots = self._check_slots(slots)
        histories = [_integers(f"histories[{j}]", h).long() for j, h in enumerate(histories)]
        if len(histories) != len(slots):
            raise ValueError(f"{len(slots)} slots but {len(histories)} histories")
        for h in histories:
            if h.dim() != 1 or (len(h) and not 1 <= h.min() <= h.max() <= self.n_items):
                raise ValueError(f"a history must be 1-d item ids in 1..{self.n_items}, got {h.tolist()}")
        self.reset(slots)
        for length in sorted({len(h) for h in histories} - {0}):
            group = [j for j, h in enumerate(histories) if len(h) == length]
            state = self._run(torch.stack([histories[j] for j in group]).to(self.device))  # from (n, T) items
            for view, new in zip(self._batch_first(self.state), self._batch_first(state)):
                view[slots[group]] = new

    def _run(self, items: torch.Tensor):
        """The state after items (n, T), from the parallel prefill where the model has one."""
        if hasattr(self.model, "prefill"):
            return self.model.prefill(items)
        state = self.model.allocate_state(len(items), self.device)
        for column in items.T:  # (n,)
            self.model.step(column, state)
        return state
