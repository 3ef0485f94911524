"""Cross-entropy of hidden @ weight.T without materialising the full logits."""
import contextlib
import os

import torch
import torch.nn.functional as F
import triton

from ._dispatch import kernels_flag, use_triton
from .cross_entropy import cross_entropy_fwd, cross_entropy_ref, scale_by_grad_output

MIN_CHUNK_TOKENS = 256  # below this a chunk's matmuls get too thin to use the GPU well
CPU_CHUNK_ELEMENTS = 1 << 22  # CPU path: 16 MB of fp32 logits per chunk (fastest of 2-32 MB at V=32000, H=256)


def fused_linear_cross_entropy_ref(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    """PyTorch reference.

    Args:
        hidden: (N, H); weight: (V, H); labels: (N,) aligned with hidden.
    Returns:
        fp32 scalar ("mean" over non-ignored labels, or "sum").
    """
    return cross_entropy_ref(F.linear(hidden, weight), labels, ignore_index, reduction)


def chunk_tokens(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: a chunk of logits about as large as the hidden states (Liger's rule), at least
    MIN_CHUNK_TOKENS."""
    per_chunk = triton.next_power_of_2(triton.cdiv(n_tokens, triton.cdiv(vocab_size, hidden_size)))
    return max(per_chunk, MIN_CHUNK_TOKENS)


_AUTOCAST_DEVICES = ("cuda", "cpu")  # meta tensors (ahead-of-time planning, kernels/_aot.py) have no autocast


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in _AUTOCAST_DEVICES else contextlib.nullcontext()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: the autocast dtype when autocast is on, else the common dtype."""
    device_type = hidden.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                         "use one dtype or run under torch.autocast")
    return hidden.dtype


def _cross_entropy_chunk_torch(logits, labels, n_valid, ignore_index: int, reduction: str, grad=None):
    """`cross_entropy_fwd`'s contract in plain torch (the chunked CPU path): (C,) fp32 row losses, and,
    when `grad` is `logits`, d(loss)/d(logits) written over the logits, scaled for the reduction."""
    lf = logits.float()
    valid = labels != ignore_index
    target = labels.clamp(0, logits.shape[1] - 1)
    lse = torch.logsumexp(lf, dim=-1)  # (C,)
    row_loss = (lse - lf.gather(1, target[:, None]).squeeze(1)) * valid
    if grad is not None:
        assert grad is logits
        scale = valid.to(lf.dtype) / (n_valid.clamp(min=1).to(lf.dtype) if reduction == "mean" else 1.0)
        probs = lf.sub_(lse[:, None]).exp_() if lf is logits else (lf - lse[:, None]).exp_()
        probs[torch.arange(len(labels), device=labels.device), target] -= valid.to(probs.dtype)
        probs.mul_(scale[:, None])
        if probs is not logits:
            logits.copy_(probs)
    return row_loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, grad_hidden_needed, grad_weight_needed,
                row_loss_fn=cross_entropy_fwd):
        n_tokens, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        dtype = _compute_dtype(hidden, weight)
        with _autocast_off(hidden.device.type):
            h, w = hidden.to(dtype), weight.to(dtype)  # no copies when the dtypes already match
            n_valid = (labels != ignore_index).sum()
            grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden_needed else None
            grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if grad_weight_needed else None
            has_grad = grad_hidden_needed or grad_weight_needed
            row_loss = []
            if row_loss_fn is cross_entropy_fwd:
                chunk = chunk_tokens(n_tokens, hidden_size, vocab_size)
            else:
                chunk = max(16, CPU_CHUNK_ELEMENTS // vocab_size)
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                h_chunk = h[start:end]  # (C, H)
                logits = h_chunk @ w.T  # (C, V): the only logits alive at any time
                # The kernel overwrites the logits with d(loss)/d(logits), scaled for the reduction.
                row_loss.append(row_loss_fn(logits, labels[start:end], n_valid, ignore_index, reduction,
                                            grad=logits if has_grad else None))
                if grad_h is not None:
                    if grad_h.dtype == dtype:
                        torch.mm(logits, w, out=grad_h[start:end])
                    else:
                        grad_h[start:end] = logits @ w
                if grad_w is not None:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(logits.T, h_chunk)
                    else:  # fp32 master weight under autocast: accumulate the bf16 product in fp32
                        grad_w += logits.T @ h_chunk
                del logits
            loss = torch.cat(row_loss).sum()
            if reduction == "mean":
                loss = loss / n_valid.clamp(min=1)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_cross_entropy (Triton): its gradients are computed in forward and "
                               "can be used by one backward only")
        grad_h, grad_w = (None if g is None else scale_by_grad_output(g, grad_output) for g in grads)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    """Linear head + cross-entropy, chunked over tokens; see `fused_linear_cross_entropy_ref`.

    Args:
        hidden: (N, H); weight: (V, H) (an fp32 weight with bf16 hidden works under torch.autocast);
        labels: (N,) int64 aligned with hidden, ignore_index where there is no target.
        reduction: "mean" over non-ignored labels, or "sum".
    Returns:
        fp32 scalar; all labels ignored gives 0 with zero gradients. The Triton path finishes both
        gradients during forward (one backward per forward); at most one chunk of logits exists at a time.
        On CPU, when gradients are needed, the same chunked algorithm runs in plain torch (it reads and
        writes a cache-sized chunk of logits instead of three full (N, V) fp32 buffers); FASTMATH_KERNELS=0
        forces the reference.
    """
    triton_path = use_triton(hidden, weight, labels)
    cpu_chunked = (not triton_path and hidden.device.type == "cpu" and kernels_flag() != "0"
                   and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    if (triton_path or cpu_chunked) and hidden.numel() > 0:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
            raise ValueError(f"fused_linear_cross_entropy: expected hidden (N, H), weight (V, H), labels (N,), got "
                             f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
        grad_on = torch.is_grad_enabled()
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, labels.contiguous(), ignore_index, reduction,
            grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            cross_entropy_fwd if triton_path else _cross_entropy_chunk_torch,
        )
    return fused_linear_cross_entropy_ref(hidden, weight, labels, ignore_index, reduction)
