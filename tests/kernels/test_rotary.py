"""Rotary kernel against an fp64 reference (q, k and both gradients), q and k in one launch."""
import pytest
import torch

from fastmath.kernels import apply_rotary, apply_rotary_ref, rotary_inv_freq


def rotary_fp64(q, k, positions, theta=10000.0, inv_freq=None):
    """HF rotate_half rotation in fp64, angles from the fp32 inv_freq and fp32 position * inv_freq (as HF)."""
    if inv_freq is None:
        inv_freq = rotary_inv_freq(q.shape[-1], theta, q.device)
    angle = (positions.float()[:, None] * inv_freq[None, :]).double()
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


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, LLAMA31])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_long_context_matches_fp64(scaling, dtype, kt, triton_only):
    """Positions up to LLaMA-3.1's 131,072 (angles up to 131,071 rad at inv_freq 1), with theta's frequencies
    and with LLaMA-3.1's scaled ones passed through `inv_freq`, forward and backward."""
    torch.manual_seed(2)
    dev, T, nh, nkv, D = kt.device, 40, 4, 2, 128
    theta = 10000.0 if scaling is None else 500000.0
    inv_freq = rotary_inv_freq(D, theta, dev, scaling=scaling)
    q = torch.randn(T, nh, D, device=dev).to(dtype)
    k = torch.randn(T, nkv, D, device=dev).to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    positions = torch.randint(100_000, 131_072, (T,), device=dev)
    positions[-1] = 131_071
    kt.require_triton(q, k, positions)

    def with_freqs(fn):
        return lambda q, k, positions, theta: fn(q, k, positions, theta, inv_freq=inv_freq)

    got = _run(with_freqs(apply_rotary), q, k, positions, dq, dk, theta)
    ref_torch = _run(with_freqs(apply_rotary_ref), q, k, positions, dq, dk, theta)
    ref64 = _run(with_freqs(rotary_fp64), q.double(), k.double(), positions, dq.double(), dk.double(), theta)
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


def test_rotary_range_reduction_exact_at_every_position(kt, triton_only):
    """The kernel's angle reduction at every position 0..131,071 at inv_freq 1 (angles up to 131,071 rad):
    the unit vector rotates to cos/sin of the fp32 angle within 2e-7 (about one fp32 rounding of cos itself).
    The tolerance rule alone is looser than this; the former 2*pi split (exact to ~25,000 rad) is 2e-6 off here."""
    dev, T = kt.device, 131_072
    positions = torch.arange(T, device=dev)
    q = torch.zeros(T, 1, 2, device=dev)
    q[:, :, 0] = 1.0
    kt.require_triton(q, positions)
    inv_freq = torch.ones(1, device=dev)
    q_rot, _ = apply_rotary(q, q[:, :, :], positions, inv_freq=inv_freq)
    angle = (positions.float() * inv_freq).double()
    assert (q_rot[:, 0, 0].double() - angle.cos()).abs().max().item() < 2e-7
    assert (q_rot[:, 0, 1].double() - angle.sin()).abs().max().item() < 2e-7
