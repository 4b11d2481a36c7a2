"""Training on N processes: N=1 runs `fit` in this process, N>1 runs `recblr train` under torchrun (DDP).

Both are the same training code (recblr.train.fit reads its rank from torchrun's environment), so N only
sets how many ranks share each global batch. For N > 1, rank 0's outputs (the `--json` summary line and
checkpoint.pt) are read back into fit's return value, so callers handle both alike.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.errors import PipelineError
from recblr.evaluate import metric_keys
from recblr.train import TrainConfig, fit

TAIL_LINES = 30
RANK_LINE = re.compile(r"\[rank\d+\]:")  # how `torchrun --role=rank --tee=2` labels a rank's stderr line


def resolve_nproc(nproc_per_node: int | str) -> int:
    """A positive process count from an int, a digit string (the CLI's) or "auto" (every visible GPU, else 1)."""
    if nproc_per_node == "auto":
        return max(torch.cuda.device_count(), 1)
    if not str(nproc_per_node).isdigit() or int(nproc_per_node) < 1:
        raise PipelineError(f"nproc_per_node must be a positive integer or 'auto', got {nproc_per_node!r}")
    return int(nproc_per_node)


def fit_on_processes(nproc: int, data_dir: Path, run_dir: Path, model: str = "recblr", *,
                     overrides: Optional[dict] = None, train: Optional[TrainConfig] = None,
                     on_epoch: Optional[Callable[[int, dict], None]] = None) -> dict:
    """recblr.train.fit on DATA_DIR/prepared with `nproc` DDP ranks; fit's return value either way.

    on_epoch sees every epoch's record: as it ends with one process; with more, replayed from rank 0's
    history once the ranks have finished, since they cannot call back into this process.
    """
    if nproc == 1:
        return fit(Path(data_dir) / "prepared", run_dir, model, overrides=overrides, train=train, on_epoch=on_epoch)
    summary = run_ranks(nproc, train_args(data_dir, run_dir, model, overrides, train or TrainConfig()))
    result = rank0_result(Path(run_dir), summary)
    for record in result["history"] if on_epoch else []:
        on_epoch(record["epoch"], record)
    return result


def cli_option(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):  # typer's --flag / --no-flag pair
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag}={value}"


def train_args(data_dir: Path, run_dir: Path, model: str, overrides: Optional[dict], train: TrainConfig) -> list[str]:
    """`recblr train ... --json` with the fields of `train` that differ from TrainConfig's defaults."""
    changed = {f.name: getattr(train, f.name) for f in dataclasses.fields(train)
               if getattr(train, f.name) != f.default}
    options = [cli_option(name, value) for name, value in changed.items()]
    sets = [f"--set={key}={json.dumps(value)}" for key, value in (overrides or {}).items()]  # _parse_sets reads JSON
    return ["train", f"--data-dir={data_dir}", f"--run-dir={run_dir}", f"--model={model}", *options, *sets, "--json"]


def run_ranks(nproc: int, cli_args: list[str]) -> dict:
    """`recblr CLI_ARGS` on nproc ranks under torchrun, its log passed through as it comes; rank 0's JSON summary.

    --standalone picks a free rendezvous port, so two trainings on one host do not collide; --tee labels
    each rank's stderr line, so a failure can quote what the ranks said apart from torchrun's own report.
    Only the summary goes to stdout (--json): it is collected in a file while the log (stderr) streams.
    """
    ranks_tail: deque[str] = deque(maxlen=TAIL_LINES)
    torchrun_tail: deque[str] = deque(maxlen=TAIL_LINES)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryDirectory(prefix="recblr-torchrun-") as logs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "--role=rank", "--tee=2", f"--log-dir={logs}", "-m", "pipeline.cli", *cli_args]
        ranks = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            for line in ranks.stderr:
                sys.stderr.write(line)
                (ranks_tail if RANK_LINE.match(line) else torchrun_tail).append(line)
            code = ranks.wait()
        finally:
            if ranks.poll() is None:  # interrupted (a killed task, Ctrl-C): stop the ranks, which hold the GPUs
                ranks.terminate()
                ranks.wait()
        stdout.seek(0)
        printed = stdout.read()
    sys.stdout.write(printed)
    if code != 0:
        raise PipelineError(f"training on {nproc} processes under torchrun exited with code {code}\n"
                            f"last lines of the ranks:\n{''.join(ranks_tail)}"
                            f"last lines of torchrun:\n{''.join(torchrun_tail)}")
    return json.loads(printed.splitlines()[-1])  # --json: the summary is the last line


def rank0_result(run_dir: Path, summary: dict) -> dict:
    """fit's return value rebuilt from what rank 0 left: its summary line and its last checkpoint."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {"model": checkpoint["model"], "config": checkpoint["config"], "train": checkpoint["train"],
            "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "stopped": summary["stopped"],
            "valid": summary["valid"],
            "test": {key: summary[key] for key in metric_keys()}, "history": checkpoint["progress"]["history"],
            "model_path": summary["model_path"], "seconds": summary["seconds"]}
