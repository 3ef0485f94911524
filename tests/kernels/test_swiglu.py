"""SwiGLU kernel against an fp64 reference (output, dgate, dup)."""
import pytest
import torch

from fastmath.kernels import swiglu, swiglu_ref


def swiglu_fp64(gate, up):
    return gate * torch.sigmoid(gate) * up


def _check(kt, gate, up, dy, dtype=None):
    out, (dg, du) = kt.forward_backward(swiglu, (gate, up), grad_out=dy)
    t_out, (t_dg, t_du) = kt.forward_backward(swiglu_ref, (gate, up), grad_out=dy)
    r_out, (r_dg, r_du) = kt.forward_backward(swiglu_fp64, (gate.double(), up.double()), grad_out=dy.double())
    kt.assert_matches("out", out, t_out, r_out, dtype)
    kt.assert_matches("dgate", dg, t_dg, r_dg, dtype)
    kt.assert_matches("dup", du, t_du, r_du, dtype)


@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (2, 3, 1000), (3, 11008), (1, 13824)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_fp64(shape, dtype, kt, triton_only):
    torch.manual_seed(0)
    gate = (torch.randn(shape, device=kt.device) * 4).to(dtype)
    up = torch.randn(shape, device=kt.device).to(dtype)
    gate.view(-1)[0] = -100.0  # exp overflow side of the sigmoid
    dy = torch.randn(shape, device=kt.device).to(dtype)
    kt.require_triton(gate, up)
    _check(kt, gate, up, dy)


def test_swiglu_autocast_and_mixed_dtypes(kt, triton_only):
    torch.manual_seed(1)
    gate = torch.randn(4, 300, device=kt.device).to(torch.bfloat16)
    up = torch.randn(4, 300, device=kt.device)  # fp32 up: the output still has gate's dtype
    dy = torch.randn(4, 300, device=kt.device).to(torch.bfloat16)
    kt.require_triton(gate, up)
    with torch.autocast(kt.device, dtype=torch.bfloat16):
        out, (dg, du) = kt.forward_backward(swiglu, (gate, up), grad_out=dy)
    assert (out.dtype, dg.dtype, du.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    _check(kt, gate, up, dy, torch.bfloat16)


def test_swiglu_non_contiguous_input(kt, triton_only):
    torch.manual_seed(2)
    both = torch.randn(6, 2 * 70, device=kt.device)
    gate, up = both[:, :70], both[:, 70:]
    kt.require_triton(gate, up)
    out = swiglu(gate, up)
    kt.assert_matches("out", out, swiglu_ref(gate, up), swiglu_fp64(gate.double(), up.double()))
