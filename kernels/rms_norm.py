"""RMSNorm: y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight, statistics in fp32."""
import torch

from ._dispatch import use_triton


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension; see `rms_norm_ref` for the exact semantics."""
    if use_triton(x, weight):
        pass  # Triton path: added by the kernels issue
    return rms_norm_ref(x, weight, eps)
