"""SwiGLU activation: silu(gate) * up."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import on_gpu, use_triton

BLOCK = 1024  # elements per program; the op is elementwise, so rows do not matter
BLOCK_INTERPRETED = 16384  # the interpreter pays per program, not per element


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: silu(gate) * up computed in fp32, returned in gate.dtype. Shapes equal."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _sigmoid(x):
    # exp of -|x| only: never overflows
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr,
    # sizes
    n_elements,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    tl.store(out_ptr + offs, (g * sig * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    # sizes
    n_elements,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    # Recompute the sigmoid instead of saving it: reading gate again is cheaper than a saved fp32 tensor.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(dgate_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    return BLOCK if on_gpu(t) else BLOCK_INTERPRETED


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, one shape -> silu(gate) * up in gate.dtype."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n, block = gate.numel(), _block(gate)
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """dy, gate, up contiguous, one shape -> (dgate, dup) in the dtypes of gate and up."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    n, block = gate.numel(), _block(gate)
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dgate, dup, n, BLOCK=block, num_warps=4)
    return dgate, dup


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the sigmoid in fp32; see `swiglu_ref`.

    Args:
        gate, up: tensors of one shape (..., I), any float dtypes.
    Returns:
        (..., I) in gate.dtype.
    """
    if use_triton(gate, up) and gate.numel() > 0:
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        return _SwiGLU.apply(gate.contiguous(), up.contiguous())
    return swiglu_ref(gate, up)
