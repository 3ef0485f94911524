"""Rotary position embedding, Hugging Face rotate_half convention, out of place."""
import math

import torch
import triton
import triton.language as tl

from ._dispatch import num_warps_for, rows_per_program, use_triton


def rotary_inv_freq(head_dim: int, theta: float = 10000.0, device=None, scaling: dict | None = None) -> torch.Tensor:
    """inv_freq (head_dim // 2,) in fp32, computed exactly as transformers' LLaMA does.

    Args:
        scaling: None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"} (LLaMA-3.1): long wavelengths are divided by `factor`, short
            ones kept, and the band between interpolated (transformers' `_compute_llama3_parameters`).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return inv_freq
    if scaling["rope_type"] != "llama3":
        raise ValueError(f"rope scaling type {scaling['rope_type']!r} is not supported (default or llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None):
    """cos, sin (T, head_dim) in fp32 for positions (T,); `inv_freq` (head_dim // 2,) overrides theta (scaled rope)."""
    if inv_freq is None:
        inv_freq = rotary_inv_freq(head_dim, theta, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
                     cos_sin=None, inv_freq: torch.Tensor | None = None):
    """PyTorch reference.

    Args:
        q: (T, n_heads, D); k: (T, n_kv_heads, D); positions: (T,) int64.
        cos_sin: optional `rotary_cos_sin(positions, D, theta)`, computed once by a caller with many layers.
        inv_freq: optional (D // 2,) fp32 frequencies (e.g. `rotary_inv_freq(D, theta, scaling=...)`); replaces theta.
    Returns:
        (q_rot, k_rot) with the shapes and dtypes of q and k; math in fp32.
    """
    if cos_sin is None:
        cos_sin = rotary_cos_sin(positions, q.shape[-1], theta, inv_freq)
    cos, sin = cos_sin
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D)

    def rot(x):
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rot(q), rot(k)


# 2*pi split in three (Cody-Waite): _TWO_PI_1 = 201/2^5 and _TWO_PI_2 = 507/2^18 have 8 and 9 significant
# bits, so k * _TWO_PI_1 and k * _TWO_PI_2 are exact in fp32 for k < 2^15 turns; _TWO_PI_3 is the fp32 rest
# (2*pi - the three is 2e-14). The reduction is exact to ~1e-8 for angles up to ~205,000 rad, i.e. every
# position of LLaMA-3.1's 131,072 context at inv_freq <= 1 (tests/kernels/test_rotary.py checks 131,071).
_TWO_PI_1 = tl.constexpr(6.28125)
_TWO_PI_2 = tl.constexpr(0.001934051513671875)
_TWO_PI_3 = tl.constexpr(1.2556658930407139e-06)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, cos, sin,
    stride_xt, stride_xh, stride_ot, stride_oh,
    tokens, n_tokens, n_heads, half_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate all heads of a block of tokens: halves x1, x2 -> x1*c - x2*s, x2*c + x1*s."""
    t = tokens[:, None, None]  # (BLOCK_T, 1, 1)
    h = tl.arange(0, BLOCK_H)[None, :, None]  # (1, BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    mask = (t < n_tokens) & (h < n_heads) & (d < half_dim)
    x_first = x_ptr + t * stride_xt + h * stride_xh + d
    o_first = out_ptr + t * stride_ot + h * stride_oh + d
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half_dim, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_first + half_dim, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr,
    # strides
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    # sizes
    n_tokens, n_q_heads, n_k_heads, half_dim,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_BACKWARD: tl.constexpr,
):
    # One program per block of tokens: cos/sin are computed once and shared by every q and k head.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    d = tl.arange(0, BLOCK_D)
    inv_freq = tl.load(inv_freq_ptr + d, mask=d < half_dim, other=0.0)
    pos = tl.load(pos_ptr + tokens, mask=tokens < n_tokens, other=0).to(tl.float32)
    angle = pos[:, None] * inv_freq[None, :]  # (BLOCK_T, BLOCK_D) fp32, exactly as the reference
    # Reduce to [-pi, pi] first: GPU sin/cos may be approximate for large arguments.
    turns = tl.floor(angle * _INV_TWO_PI + 0.5)
    angle = ((angle - turns * _TWO_PI_1) - turns * _TWO_PI_2) - turns * _TWO_PI_3
    cos = tl.cos(angle)[:, None, :]  # (BLOCK_T, 1, BLOCK_D)
    sin = tl.sin(angle)[:, None, :]
    if IS_BACKWARD:  # the transpose of a rotation is the rotation by -angle
        sin = -sin
    _rotate_heads(q_ptr, q_out_ptr, cos, sin, stride_qt, stride_qh, stride_qot, stride_qoh,
                  tokens, n_tokens, n_q_heads, half_dim, BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, cos, sin, stride_kt, stride_kh, stride_kot, stride_koh,
                  tokens, n_tokens, n_k_heads, half_dim, BLOCK_KH, BLOCK_D)


def _rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, backward: bool):
    """q (T, n_heads, D), k (T, n_kv_heads, D), unit stride in D -> rotated copies (contiguous)."""
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_qh, block_kh = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_d = triton.next_power_of_2(head_dim // 2)
    block_t = rows_per_program(n_tokens, (block_qh + block_kh) * block_d, q)
    _rotary_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, positions, inv_freq, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        n_tokens, n_q_heads, n_k_heads, head_dim // 2,
        BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d, IS_BACKWARD=backward,
        num_warps=num_warps_for(block_t * block_qh * block_d),
    )
    return q_out, k_out


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return _rotary(q, k, positions, inv_freq, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _rotary(_unit_stride(dq), _unit_stride(dk), positions, inv_freq, backward=True)
        return dq, dk, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
                 cos_sin=None, inv_freq: torch.Tensor | None = None):
    """Rotate q and k by their positions (HF rotate_half convention); see `apply_rotary_ref`.

    Args:
        q: (T, n_heads, D); k: (T, n_kv_heads, D); positions: (T,) integer.
        theta: rope base; inv_freq is computed in fp32 exactly as transformers does.
        cos_sin: optional precomputed `rotary_cos_sin(positions, D, theta)` for the reference path (the
            kernel computes its angles on the fly and ignores it).
        inv_freq: optional (D // 2,) fp32 frequencies replacing theta's, e.g. LLaMA-3.1's scaled ones from
            `rotary_inv_freq(D, theta, scaling=...)`; both paths use them.
    Returns:
        (q_rot, k_rot), new tensors with the shapes and dtypes of q and k.
    """
    if use_triton(q, k, positions) and q.numel() > 0:
        if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
            raise ValueError(f"apply_rotary: expected q (T, n_heads, D) and k (T, n_kv_heads, D) with even D, "
                             f"got {tuple(q.shape)} and {tuple(k.shape)}")
        if positions.shape != (q.shape[0],):
            raise ValueError(f"apply_rotary: positions shape {tuple(positions.shape)} should be ({q.shape[0]},)")
        if inv_freq is None:
            inv_freq = rotary_inv_freq(q.shape[-1], theta, q.device)
        elif inv_freq.shape != (q.shape[-1] // 2,):
            raise ValueError(f"apply_rotary: inv_freq shape {tuple(inv_freq.shape)} should be ({q.shape[-1] // 2},)")
        return _Rotary.apply(_unit_stride(q), _unit_stride(k), positions.contiguous(), inv_freq.float().contiguous())
    return apply_rotary_ref(q, k, positions, theta, cos_sin, inv_freq)
