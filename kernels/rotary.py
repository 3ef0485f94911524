"""Rotary position embedding, Hugging Face rotate_half convention, out of place."""
import torch

from ._dispatch import use_triton


def rotary_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """inv_freq (head_dim // 2,) in fp32, computed exactly as transformers' LLaMA does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin (T, head_dim) in fp32 for positions (T,)."""
    inv_freq = rotary_inv_freq(head_dim, theta, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0):
    """PyTorch reference.

    Args:
        q: (T, n_heads, D); k: (T, n_kv_heads, D); positions: (T,) int64.
    Returns:
        (q_rot, k_rot) with the shapes and dtypes of q and k; math in fp32.
    """
    cos, sin = rotary_cos_sin(positions, q.shape[-1], theta)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D)

    def rot(x):
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rot(q), rot(k)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0):
    """Rotate q and k by their positions; see `apply_rotary_ref`."""
    if use_triton(q, k):
        pass  # Triton path: added by the kernels issue
    return apply_rotary_ref(q, k, positions, theta)
