"""RMSNorm: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight, statistics in fp32."""
import torch
import triton
import triton.language as tl

from ._dispatch import num_warps_for, num_workers, rows_per_program, use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PyTorch reference (Hugging Face LlamaRMSNorm casting).

    Args:
        x: (..., H) any float dtype.
        weight: (H,).
    Returns:
        (..., H) in x.dtype.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype).mul(weight).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    # strides
    stride_x, stride_y,
    # sizes
    n_rows, n_cols, eps,
    # meta-parameters
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]  # (BLOCK_ROWS, BLOCK)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_ROWS,)
    # HF rounds x * rstd to x.dtype before multiplying by the weight.
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = (normed * w[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    # strides
    stride_dy, stride_x, stride_dx, stride_dw,
    # sizes
    n_rows, n_cols, rows_per_program,
    # meta-parameters
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks a contiguous range of rows and keeps its own fp32 partial of dW:
    # the partials are summed on the host, so there are no float atomics.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for block_start in range(row_start, row_end, BLOCK_ROWS):
        rows = block_start + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < row_end, other=0.0)[:, None]
        normed = x * rstd
        dw_acc += tl.sum(dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=1) / n_cols)[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * stride_dw + cols, dw_acc, mask=col_mask)


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x (N, H) contiguous -> y (N, H) in x.dtype, rstd (N,) fp32."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    block_rows = rows_per_program(n_rows, n_cols, x)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, weight, y, rstd,
        x.stride(0), y.stride(0),
        n_rows, n_cols, eps,
        BLOCK_ROWS=block_rows, BLOCK=block, num_warps=num_warps_for(block * block_rows),
    )
    return y, rstd


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """dy, x (N, H) contiguous; rstd (N,) -> dx (N, H) in x.dtype, dw (H,) in weight.dtype."""
    n_rows, n_cols = x.shape
    block = triton.next_power_of_2(n_cols)
    block_rows = rows_per_program(n_rows, n_cols, x)
    num_warps = num_warps_for(block * block_rows)
    # A persistent grid of one program per SM leaves an SM with one block's warps: 8 of 64 at H=4096, too few
    # to keep a memory-bound loop fed. Launch enough programs for ~16 resident warps per SM (two blocks of 8
    # warps fit at H=4096: ~125 registers each); the extra dW partials cost ~1% more traffic.
    n_programs = min(num_workers(x) * max(1, 16 // num_warps), triton.cdiv(n_rows, block_rows))
    rows_each = triton.cdiv(triton.cdiv(n_rows, n_programs), block_rows) * block_rows
    n_programs = triton.cdiv(n_rows, rows_each)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(n_programs, n_cols, dtype=torch.float32, device=x.device)  # (n_programs, H)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy, x, weight, rstd, dx, dw_partial,
        dy.stride(0), x.stride(0), dx.stride(0), dw_partial.stride(0),
        n_rows, n_cols, rows_each,
        BLOCK_ROWS=block_rows, BLOCK=block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, H)
        y, rstd = _rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension; see `rms_norm_ref` for the exact semantics.

    Args:
        x: (..., H) any float dtype (bf16 activations with an fp32 weight under autocast work).
        weight: (H,).
        eps: added to mean(x^2) before the reciprocal square root.
    Returns:
        (..., H) in x.dtype.
    """
    if use_triton(x, weight) and x.numel() > 0:
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
        return _RMSNorm.apply(x, weight.contiguous(), eps)
    return rms_norm_ref(x, weight, eps)
