"""Passes of a training step (recblr.train.EagerStep or GraphedStep) over windows, for the tests that compare steps,
and a stand-in for training that runs out of GPU memory."""
from __future__ import annotations

import numpy as np
import torch


def steps_over(step, start, stop, cfg, order=None, passes=3, check_last_pass=False):
    """The losses of `passes` passes of `step` over the windows in `order` (default: as listed); with
    check_last_pass the last pass, when every width has its graph, runs with the sync debug mode at "error", so any
    wait for the GPU raises."""
    order = np.arange(len(start)) if order is None else order
    losses = []
    for n in range(passes):
        for lo in range(0, len(order), cfg.batch_size):
            batch = order[lo:lo + cfg.batch_size]
            torch.cuda.set_sync_debug_mode("error" if check_last_pass and n == passes - 1 else "default")
            try:
                loss = step(start[batch], stop[batch])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            losses.append(loss.clone())  # a replay rewrites its loss in place
    return torch.stack(losses)


def out_of_memory(*args, **kwargs):
    """Patched over a training function: raises what PyTorch raises when the GPU runs out of memory."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
