"""Cross-entropy over aligned (logits, labels): no shifting inside."""
import torch
import torch.nn.functional as F

from ._dispatch import use_triton


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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy; see `cross_entropy_ref`."""
    if use_triton(logits):
        pass  # Triton path: added by the kernels issue
    return cross_entropy_ref(logits, labels, ignore_index, reduction)
