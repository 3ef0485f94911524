"""Cross-entropy over aligned (logits, labels): no shifting inside."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import num_warps_for, rows_per_program, use_triton

MAX_BLOCK_V = 32768  # widest vocab block one program holds in registers


def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """PyTorch reference.

    Args:
        logits: (N, V) any float dtype; labels: (N,) int64, ignore_index where there is no target.
        reduction: "mean" (over non-ignored labels) or "sum".
    Returns:
        fp32 scalar. All labels ignored gives 0 with zero gradients.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, labels_ptr, n_valid_ptr, loss_ptr, grad_ptr,
    # strides
    stride_logits, stride_grad,
    # sizes
    n_rows, n_cols, ignore_index,
    # meta-parameters
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr, IS_MEAN: tl.constexpr,
):
    """Losses of BLOCK_ROWS rows and (HAS_GRAD) their gradients (softmax - onehot) * scale.

    grad_ptr may alias logits_ptr: each block is read before it is overwritten and never read again.
    Ignored rows read nothing, give loss 0 and a zero gradient row.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    row_mask = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (labels != ignore_index)
    logits_rows = logits_ptr + rows[:, None] * stride_logits  # (BLOCK_ROWS, 1)

    # Pass 1: online logsumexp over vocab blocks (running max m, running sum d of exp(x - m)).
    m = tl.zeros((BLOCK_ROWS,), dtype=tl.float32) - float("inf")
    d = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_rows + cols[None, :], mask=valid[:, None] & (cols < n_cols)[None, :], other=0.0)
        x = tl.where((cols < n_cols)[None, :], x.to(tl.float32), float("-inf"))  # (BLOCK_ROWS, BLOCK)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(logits_ptr + rows * stride_logits + labels, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_mask)

    # Pass 2: the gradient, already scaled for the reduction, so backward only multiplies by grad_output.
    if HAS_GRAD:
        scale = 1.0
        if IS_MEAN:
            scale = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        scale = tl.where(valid, scale, 0.0)[:, None]  # (BLOCK_ROWS, 1): ignored rows get zeros
        grad_rows = grad_ptr + rows[:, None] * stride_grad
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_mask = (cols < n_cols)[None, :]
            x = tl.load(logits_rows + cols[None, :], mask=valid[:, None] & col_mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None])
            g = tl.where(cols[None, :] == labels[:, None], g - 1.0, g) * scale
            tl.store(grad_rows + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask)


def cross_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor, n_valid: torch.Tensor, ignore_index: int,
                      reduction: str, grad: torch.Tensor = None) -> torch.Tensor:
    """Launch the loss (and gradient) kernel: one program per row on a GPU (rows are wide).

    Args:
        logits: (N, V) with unit stride in V; labels: (N,) int64; n_valid: () count of non-ignored labels
            (read on the device: no host sync).
        grad: None, or (N, V) with unit stride in V to receive d(loss)/d(logits); may be `logits` itself.
    Returns:
        (N,) fp32 per-row losses (0 for ignored rows).
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    block_rows = rows_per_program(n_rows, block, logits)
    _cross_entropy_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        logits, labels, n_valid, loss, grad if grad is not None else logits,
        logits.stride(0), grad.stride(0) if grad is not None else 0,
        n_rows, n_cols, ignore_index,
        BLOCK_ROWS=block_rows, BLOCK=block, HAS_GRAD=grad is not None, IS_MEAN=reduction == "mean",
        num_warps=num_warps_for(block * block_rows),
    )
    return loss


def scale_by_grad_output(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Multiply a gradient finished in forward by d(total)/d(loss), in place; skipped when that is 1."""
    if not torch.equal(grad_output, torch.ones_like(grad_output)):
        grad.mul_(grad_output.to(grad.dtype))
    return grad


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, needs_grad):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        n_valid = (labels != ignore_index).sum()
        # The logits' own gradient, finished here: no other (N, V) buffer is allocated.
        ctx.grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if needs_grad else None
        loss = cross_entropy_fwd(logits, labels, n_valid, ignore_index, reduction, ctx.grad).sum()
        if reduction == "mean":
            loss = loss / n_valid.clamp(min=1)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("cross_entropy (Triton): its gradient is computed in forward and can be used by one backward only")
        return scale_by_grad_output(grad, grad_output), None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of aligned rows; see `cross_entropy_ref`.

    Args:
        logits: (N, V) any float dtype; labels: (N,) int64 (ignore_index: no target).
        reduction: "mean" over non-ignored labels, or "sum".
    Returns:
        fp32 scalar; all labels ignored gives 0 with zero gradients. The Triton path computes the
        gradient during forward (one backward per forward).
    """
    if use_triton(logits, labels) and logits.numel() > 0:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"cross_entropy: expected logits (N, V) and labels (N,), got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
        needs_grad = torch.is_grad_enabled() and logits.requires_grad
        return _CrossEntropy.apply(logits, labels.contiguous(), ignore_index, reduction, needs_grad)
    return cross_entropy_ref(logits, labels, ignore_index, reduction)
