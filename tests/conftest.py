import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
# kernels/: without a GPU the Triton kernels then run on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
