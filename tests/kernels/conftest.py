"""Shared helpers for the kernel tests.

They run the public functions of fastmath.kernels on CUDA tensors when a GPU is present, else on CPU
tensors under the Triton interpreter (`make test-kernels` sets TRITON_INTERPRET=1 FASTMATH_KERNELS=1).
Helpers reach the test files through the `kt` fixture (tests/ has no __init__.py, so conftest is not
importable by name). The `triton_only` fixture makes every PyTorch reference raise when a public function reaches it, so a
passing test proves the Triton path ran. Pass rule (flash-attn's): the kernel's error against an fp64
reference is at most 2x PyTorch's own error in the same dtype, plus atol: 1e-5 (+ one fp32 ulp of
max|reference|), and in bf16 under the interpreter (which truncates instead of rounding) one bf16 ulp of
max|reference|. On a GPU the bf16 ulp allowance is dropped.

FASTMATH_TEST_RTNE=1 makes the interpreter round fp32 -> bf16 to nearest even, as a GPU does, and drops
the bf16 ulp allowance: the GPU's pass rule, checked on the CPU (`make test-kernels` runs both modes).
"""
import importlib
import math
import os
from types import SimpleNamespace

import pytest
import torch

from fastmath.kernels import use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTNE = DEVICE == "cpu" and os.environ.get("FASTMATH_TEST_RTNE") == "1"
INTERPRETED = DEVICE == "cpu" and not RTNE  # the bf16 allowance: truncating interpreter casts


def _round_bf16_to_nearest_even():
    """Patch the Triton interpreter's fp32 -> bf16 cast (truncation) to round to nearest even (torch's cast)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if RTNE:
    _round_bf16_to_nearest_even()

# (module, name of the reference the public function falls back to)
_REFERENCES = [
    ("fastmath.kernels.rms_norm", "rms_norm_ref"),
    ("fastmath.kernels.rotary", "apply_rotary_ref"),
    ("fastmath.kernels.cross_entropy", "cross_entropy_ref"),
    ("fastmath.kernels.fused_linear_cross_entropy", "fused_linear_cross_entropy_ref"),
    ("fastmath.kernels.swiglu", "swiglu_ref"),
]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_only(monkeypatch):
    """Make the references unreachable from the public functions (tests keep their own imported copies)."""
    monkeypatch.setenv("FASTMATH_KERNELS", "1")
    forbid_references(monkeypatch)


def forbid_references(monkeypatch):
    """Replace each reference, as its public function sees it, by one that raises."""
    for module_name, name in _REFERENCES:

        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran: the public function did not take the Triton path")

        monkeypatch.setattr(importlib.import_module(module_name), name, forbidden)


def require_triton(*tensors):
    """Skip with the reason when the switch would not run Triton for these tensors."""
    if not use_triton(*tensors):
        pytest.skip("Triton path is off here: run `make test-kernels` (TRITON_INTERPRET=1 FASTMATH_KERNELS=1) or use a GPU")


def _ulp(top: float, mantissa_bits: int) -> float:
    return 2.0 ** (math.floor(math.log2(top)) - mantissa_bits) if top > 0 else 0.0


def atol_for(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """1e-5 plus one fp32 ulp of max|ref| (no fp32 result can be closer than half an ulp: this matters for
    large sums such as a summed loss), plus one bf16 ulp of max|ref| for bf16 under the interpreter."""
    top = ref.abs().max().item() if ref.numel() else 0.0
    atol = 1e-5 + _ulp(top, 23)
    if dtype == torch.bfloat16 and INTERPRETED:
        atol += _ulp(top, 7)
    return atol


def assert_matches(name: str, out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, dtype=None):
    """Kernel error vs fp64 <= 2 x PyTorch's error in the same dtype + atol; dtypes of out and torch_out equal."""
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype}, PyTorch gives {torch_out.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    err_torch = (torch_out.double() - ref64).abs().max().item() if out.numel() else 0.0
    atol = atol_for(dtype or out.dtype, ref64)
    assert err <= 2 * err_torch + atol, (
        f"{name}: kernel error {err:.3e} > 2 x PyTorch error {err_torch:.3e} + atol {atol:.1e}"
    )


def leaves(*tensors):
    """Detached copies that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def forward_backward(fn, inputs, *args, grad_out=None, **kwargs):
    """Run fn(*inputs, *args) and backpropagate grad_out (or 1 for a scalar).

    Returns (output, [grad of each input]).
    """
    inputs = leaves(*inputs)
    out = fn(*inputs, *args, **kwargs)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), [t.grad for t in inputs]


@pytest.fixture
def kt():
    """The helpers above, for the test files."""
    return SimpleNamespace(
        device=DEVICE, interpreted=INTERPRETED, require_triton=require_triton, forbid_references=forbid_references, atol_for=atol_for,
        assert_matches=assert_matches, leaves=leaves, forward_backward=forward_backward,
    )
