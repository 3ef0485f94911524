"""RMSNorm kernel against an fp64 reference (output, dx, dweight)."""
import pytest
import torch

from fastmath.kernels import rms_norm, rms_norm_ref

EPS = 1e-5


def rms_norm_fp64(x, w, eps=EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _check(kt, x, w, dy, dtype=None):
    out, (dx, dw) = kt.forward_backward(rms_norm, (x, w), EPS, grad_out=dy)
    t_out, (t_dx, t_dw) = kt.forward_backward(rms_norm_ref, (x, w), EPS, grad_out=dy)
    r_out, (r_dx, r_dw) = kt.forward_backward(rms_norm_fp64, (x.double(), w.double()), EPS, grad_out=dy.double())
    dtype = dtype or x.dtype
    kt.assert_matches("y", out, t_out, r_out, dtype)
    kt.assert_matches("dx", dx, t_dx, r_dx, dtype)
    kt.assert_matches("dw", dw, t_dw, r_dw, dtype)


@pytest.mark.parametrize("shape", [(1, 64), (5, 123), (2, 3, 96), (3, 4096), (2, 5120), (37, 256), (300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_fp64(shape, dtype, kt, triton_only):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=kt.device) * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=kt.device)).to(dtype)
    dy = torch.randn(shape, device=kt.device).to(dtype)
    kt.require_triton(x, w)
    _check(kt, x, w, dy)


def test_rms_norm_autocast_bf16_activations_fp32_weight(kt, triton_only):
    torch.manual_seed(1)
    x = torch.randn(7, 160, device=kt.device).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(160, device=kt.device)
    dy = torch.randn(7, 160, device=kt.device).to(torch.bfloat16)
    kt.require_triton(x, w)
    with torch.autocast(kt.device, dtype=torch.bfloat16):
        out, (dx, dw) = kt.forward_backward(rms_norm, (x, w), EPS, grad_out=dy)
    assert (out.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    _check(kt, x, w, dy, torch.bfloat16)


def test_rms_norm_rejects_wrong_weight(kt, triton_only):
    x = torch.randn(2, 8, device=kt.device)
    kt.require_triton(x)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(9, device=kt.device))
