"""Per-call choice between the Triton kernels and the PyTorch references.

Triton runs on CUDA tensors. On CPU tensors the reference runs, unless the process was
started with TRITON_INTERPRET=1 *and* FASTMATH_KERNELS=1 (the interpreter is fixed when
``@triton.jit`` decorates, so the first variable must be set before ``fastmath.kernels``
is imported; the second is read on every call). FASTMATH_KERNELS=0 forces the references.
"""
import contextlib
import contextvars
import os

import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency
    HAS_TRITON = False

# Read once, like triton itself: a kernel decorated without the interpreter cannot run on CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The explicit switch: `with kernels_mode("off"):` (or "on", "auto") overrides FASTMATH_KERNELS for the code
# inside, in this thread of control only, and restores the previous choice on exit. The trainer's --kernels
# uses it, so a training run no longer leaves a process-wide environment variable behind. None: the
# environment decides (tests and users keep FASTMATH_KERNELS).
_MODE: contextvars.ContextVar = contextvars.ContextVar("fastmath_kernels_mode", default=None)
_FLAGS = {"on": "1", "off": "0", "auto": ""}


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Choose the fused kernels for the code inside: "on" (Triton, also on CPU tensors when the process
    started under TRITON_INTERPRET=1), "off" (PyTorch references) or "auto" (Triton on CUDA tensors)."""
    if mode not in _FLAGS:
        raise ValueError(f"kernels mode must be one of on, off, auto, not {mode!r}")
    token = _MODE.set(_FLAGS[mode])
    try:
        yield
    finally:
        _MODE.reset(token)


def kernels_flag() -> str:
    """"1", "0" or "" (auto): the innermost kernels_mode, else FASTMATH_KERNELS."""
    mode = _MODE.get()
    return os.environ.get("FASTMATH_KERNELS", "") if mode is None else mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors."""
    flag = kernels_flag()
    if flag == "0" or not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and flag == "1"


def kernel_status() -> str:
    """One line for `fastmath info`."""
    if not HAS_TRITON:
        return "off (triton is not installed)"
    if kernels_flag() == "0":
        return "off (FASTMATH_KERNELS=0)"
    if torch.cuda.is_available():
        return "on for CUDA tensors"
    if INTERPRET and kernels_flag() == "1":
        return "on for CPU tensors (Triton interpreter)"
    return "off on CPU (PyTorch references; TRITON_INTERPRET=1 FASTMATH_KERNELS=1 runs the interpreter)"


# Streaming multiprocessors assumed when planning launches for meta tensors (an H100 SXM): the
# ahead-of-time compile test plans on the meta device exactly as it would on a GPU.
META_SM_COUNT = 132


def on_gpu(t: torch.Tensor) -> bool:
    """Plan launches for a GPU: CUDA tensors, and meta tensors (used to compile kernels ahead of time)."""
    return t.is_cuda or t.is_meta


def num_warps_for(block: int) -> int:
    """Warps for a program that walks a row of `block` elements (more warps for wider rows)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def num_workers(t: torch.Tensor) -> int:
    """Programs that walk rows in a persistent loop: one per SM on a GPU, a few under the interpreter."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return META_SM_COUNT if t.is_meta else 4


def rows_per_program(n_rows: int, row_elements: int, t: torch.Tensor) -> int:
    """Rows one program handles as a 2-D block (a power of two).

    On a GPU (or the meta device): one row when rows are wide, several when they are narrow (keeps each program ~2K elements).
    Under the interpreter every program costs milliseconds of Python whatever its size, so: as many rows
    as fit in 64K elements.
    """
    row_block = triton.next_power_of_2(max(row_elements, 1))
    if on_gpu(t):
        return max(1, min(16, 2048 // row_block))
    return max(1, min(triton.next_power_of_2(n_rows), 65536 // row_block))
