"""What the kernels share: the inputs they take, where they may run (CUDA tensors, or CPU tensors under the
interpreter, as in the tests), how they size grids and allocate outputs, and how the reference paths write rows
in place."""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(x, name: str, public: str) -> None:
    """ValueError unless x can go to a Triton kernel; `public` names the function that also takes CPU tensors."""
    if not x.is_cuda and not interpreting():
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1); use {public}")


def sm_count(device: torch.device) -> int:
    """The SMs of device's GPU, which the launchers size their grids by; 1 for the interpreter's CPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def check_float_inputs(**tensors) -> None:
    """ValueError unless every tensor given (None skipped) is float32 or bfloat16 and on the first one's device."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named:
        if t.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} must be float32 or bfloat16, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def empty(shape, dtype, device, poison: bool) -> torch.Tensor:
    """torch.empty; with poison (a launcher module's POISON_OUTPUTS, which tests set) filled with NaN, -1 for
    integers, so an element the kernel never writes surfaces in the result."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else -1) if poison else t


def copy_active(dst: torch.Tensor, src: torch.Tensor, active: torch.Tensor | None, dim: int = 0) -> None:
    """dst.copy_(src) in the rows along dim where active (B,) bool is True, every row when active is None: how
    a step keeps the state (and serving the top-k) of a user without a new event."""
    if active is not None:
        src = torch.where(active.view([-1 if d == dim else 1 for d in range(src.dim())]), src, dst)
    dst.copy_(src)
