import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
# kernels/: without a GPU the Triton kernels then run on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# GX sends usage statistics unless told not to; tests stay offline.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """get(relative) -> a file under ../shared/data (public logs beside the repo); skips when it is missing."""
    def get(relative: str) -> Path:
        path = SHARED_DATA / relative
        if not path.is_file():
            pytest.skip(f"{path} not available")
        return path
    return get
