"""Per-call choice between the Triton kernels and the PyTorch references.

Triton runs on CUDA tensors. On CPU tensors the reference runs, unless the process was
started with TRITON_INTERPRET=1 *and* FASTMATH_KERNELS=1 (the interpreter is fixed when
``@triton.jit`` decorates, so the first variable must be set before ``fastmath.kernels``
is imported; the second is read on every call). FASTMATH_KERNELS=0 forces the references.
"""
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency
    HAS_TRITON = False

# Read once, like triton itself: a kernel decorated without the interpreter cannot run on CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    flag = os.environ.get("FASTMATH_KERNELS", "")
    if flag == "0" or not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and flag == "1"


def kernel_status() -> str:
    """One line for `fastmath info`."""
    if not HAS_TRITON:
        return "off (triton is not installed)"
    if os.environ.get("FASTMATH_KERNELS", "") == "0":
        return "off (FASTMATH_KERNELS=0)"
    if torch.cuda.is_available():
        return "on for CUDA tensors"
    if INTERPRET and os.environ.get("FASTMATH_KERNELS", "") == "1":
        return "on for CPU tensors (Triton interpreter)"
    return "off on CPU (PyTorch references; TRITON_INTERPRET=1 FASTMATH_KERNELS=1 runs the interpreter)"
