"""Fused linear cross-entropy against an fp64 reference (loss, dhidden, dweight), chunked over tokens."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fastmath.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref

IGNORE = -100
flce_module = importlib.import_module("fastmath.kernels.fused_linear_cross_entropy")


def flce_fp64(hidden, weight, labels, ignore_index=IGNORE, reduction="mean"):
    loss = F.cross_entropy(hidden.double() @ weight.double().T, labels, ignore_index=ignore_index, reduction="sum")
    return loss / max((labels != ignore_index).sum().item(), 1) if reduction == "mean" else loss


def make_case(n, h, v, dtype, device, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(device=device, dtype=weight_dtype or dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = IGNORE
    return hidden, weight, labels.to(device)


def check(kt, hidden, weight, labels, reduction, grad_scale=1.0, dtype=None):
    grad_out = torch.tensor(grad_scale, device=hidden.device)
    args = (labels, IGNORE, reduction)
    out, (dh, dw) = kt.forward_backward(fused_linear_cross_entropy, (hidden, weight), *args, grad_out=grad_out)
    t_out, (t_dh, t_dw) = kt.forward_backward(fused_linear_cross_entropy_ref, (hidden, weight), *args, grad_out=grad_out)
    r_out, (r_dh, r_dw) = kt.forward_backward(flce_fp64, (hidden.double(), weight.double()), *args,
                                              grad_out=grad_out.double())
    assert out.dtype == torch.float32 and out.dim() == 0
    kt.assert_matches("loss", out, t_out, r_out, torch.float32)
    kt.assert_matches("dhidden", dh, t_dh, r_dh, dtype or hidden.dtype)
    kt.assert_matches("dweight", dw, t_dw, r_dw, dtype or weight.dtype)


@pytest.mark.parametrize("n,h,v", [(1, 16, 7), (5, 123, 123), (37, 64, 1000), (300, 32, 500), (6, 64, 32000),
                                   (3, 4096, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_matches_fp64(n, h, v, dtype, reduction, kt, triton_only):
    hidden, weight, labels = make_case(n, h, v, dtype, kt.device)
    kt.require_triton(hidden, weight, labels)
    check(kt, hidden, weight, labels, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flce_many_chunks_and_grad_output(dtype, kt, triton_only, monkeypatch):
    monkeypatch.setattr(flce_module, "MIN_CHUNK_TOKENS", 1)
    hidden, weight, labels = make_case(40, 16, 200, dtype, kt.device, seed=3)
    assert flce_module.chunk_tokens(40, 16, 200) == 4  # ten chunks
    kt.require_triton(hidden, weight, labels)
    check(kt, hidden, weight, labels, "mean", grad_scale=0.37)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flce_all_ignored_is_zero(reduction, kt, triton_only):
    hidden, weight, _ = make_case(5, 16, 50, torch.float32, kt.device)
    labels = torch.full((5,), IGNORE, device=kt.device)
    kt.require_triton(hidden, weight, labels)
    h, w = kt.leaves(hidden, weight)
    loss = fused_linear_cross_entropy(h, w, labels, IGNORE, reduction)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_flce_autocast_bf16_hidden_fp32_weight(kt, triton_only):
    hidden, weight, labels = make_case(29, 48, 333, torch.bfloat16, kt.device, seed=4, weight_dtype=torch.float32)
    kt.require_triton(hidden, weight, labels)
    with torch.autocast(kt.device, dtype=torch.bfloat16):
        check(kt, hidden, weight, labels, "sum", dtype=torch.bfloat16)
        h, w = kt.leaves(hidden, weight)
        fused_linear_cross_entropy(h, w, labels, IGNORE, "sum").backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_flce_frozen_weight_and_no_grad(kt, triton_only):
    hidden, weight, labels = make_case(9, 16, 40, torch.float32, kt.device)
    kt.require_triton(hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, labels).backward()
    assert weight.grad is None and h.grad is not None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels)
    assert abs(loss.item() - flce_fp64(hidden, weight, labels).item()) < 1e-5


def test_flce_rejects_mismatched_dtypes(kt, triton_only):
    hidden, weight, labels = make_case(3, 8, 10, torch.bfloat16, kt.device, weight_dtype=torch.float32)
    kt.require_triton(hidden, weight, labels)
    with pytest.raises(ValueError, match="use one dtype"):
        fused_linear_cross_entropy(hidden, weight, labels)
