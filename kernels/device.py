"""Where a Triton launcher may run: CUDA tensors, or CPU tensors under the interpreter (the tests)."""
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(x, name: str, public: str) -> None:
    """ValueError unless x can go to a Triton kernel; `public` names the function that also takes CPU tensors."""
    if not x.is_cuda and not interpreting():
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1); use {public}")
