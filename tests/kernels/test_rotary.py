"""Rotary kernel against an fp64 reference (q, k and both gradients), q and k in one launch."""
import pytest
import torch

from fastmath.kernels import apply_rotary, apply_rotary_ref, rotary_inv_freq


def rotary_fp64(q, k, positions, theta=10000.0):
    """HF rotate_half rotation in fp64, angles from the fp32 inv_freq and fp32 position * inv_freq (as HF)."""
    angle = (positions.float()[:, None] * rotary_inv_freq(q.shape[-1], theta, q.device)[None, :]).double()
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (T, 1, D/2)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rot(q), rot(k)


def _run(fn, q, k, positions, dq, dk, theta):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = fn(q, k, positions, theta)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


@pytest.mark.parametrize(
    "n_tokens,n_heads,n_kv_heads,head_dim,max_pos",
    [(1, 1, 1, 8, 1), (5, 3, 1, 22, 5), (17, 8, 2, 128, 8192), (9, 32, 32, 128, 4096), (6, 40, 40, 128, 8192),
     (70, 32, 8, 128, 8192)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_fp64(n_tokens, n_heads, n_kv_heads, head_dim, max_pos, dtype, kt, triton_only):
    torch.manual_seed(0)
    dev = kt.device
    q = torch.randn(n_tokens, n_heads, head_dim, device=dev).to(dtype)
    k = torch.randn(n_tokens, n_kv_heads, head_dim, device=dev).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    positions = torch.randint(0, max_pos, (n_tokens,), device=dev)
    positions[-1] = max_pos - 1  # the largest position always appears
    theta = 10000.0 if head_dim != 22 else 500000.0
    kt.require_triton(q, k, positions)
    got = _run(apply_rotary, q, k, positions, dq, dk, theta)
    ref_torch = _run(apply_rotary_ref, q, k, positions, dq, dk, theta)
    ref64 = _run(rotary_fp64, q.double(), k.double(), positions, dq.double(), dk.double(), theta)
    for name, a, b, c in zip(("q", "k", "dq", "dk"), got, ref_torch, ref64):
        kt.assert_matches(name, a, b, c, dtype)


def test_rotary_strided_views_and_autocast(kt, triton_only):
    """q and k as views into one fused qkv projection output, under autocast."""
    torch.manual_seed(1)
    dev, T, nh, nkv, D = kt.device, 11, 4, 2, 16
    qkv = torch.randn(T, (nh + 2 * nkv) * D, device=dev).to(torch.bfloat16)
    q = qkv[:, : nh * D].view(T, nh, D)
    k = qkv[:, nh * D : (nh + nkv) * D].view(T, nkv, D)
    positions = torch.arange(T, device=dev) + 1000
    kt.require_triton(q, k, positions)
    with torch.autocast(dev, dtype=torch.bfloat16):
        q_rot, k_rot = apply_rotary(q, k, positions)
    q_ref, k_ref = apply_rotary_ref(q, k, positions)
    q64, k64 = rotary_fp64(q.double(), k.double(), positions)
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    kt.assert_matches("q", q_rot, q_ref, q64)
    kt.assert_matches("k", k_rot, k_ref, k64)
    assert qkv.data_ptr() != q_rot.data_ptr()  # out of place


def test_rotary_rejects_bad_positions(kt, triton_only):
    q = torch.randn(4, 2, 8, device=kt.device)
    kt.require_triton(q)
    with pytest.raises(ValueError, match="positions shape"):
        apply_rotary(q, q, torch.arange(3, device=kt.device))
