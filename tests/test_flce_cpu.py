"""The chunked CPU path of fused_linear_cross_entropy (plain torch, gradients finished in forward)
against an fp64 reference, and against the PyTorch reference in the same dtype."""
import sys

import pytest
import torch

import fastmath.kernels  # noqa: F401
from fastmath.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref

FLCE = sys.modules["fastmath.kernels.fused_linear_cross_entropy"]


def fp64_reference(h, w, y, reduction, grad_scale):
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h @ w.T, y, ignore_index=-100, reduction="sum")
    if reduction == "mean":
        loss = loss / (y != -100).sum().clamp(min=1)
    return (loss, *torch.autograd.grad(loss * grad_scale, (h, w)))


@pytest.mark.parametrize("chunk_elements", [1 << 22, 4000])  # one chunk; many chunks of 16 rows (odd tail)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_fp64_within_2x_torch_error(monkeypatch, chunk_elements, reduction):
    monkeypatch.setattr(FLCE, "CPU_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(203, 48, generator=g).requires_grad_()
    w = (0.3 * torch.randn(250, 48, generator=g)).requires_grad_()
    y = torch.randint(0, 250, (203,), generator=g)
    y[::4] = -100
    ref = fp64_reference(h, w, y, reduction, 1.7)
    outs = {}
    for name, fn in (("fastmath", fused_linear_cross_entropy), ("torch", fused_linear_cross_entropy_ref)):
        loss = fn(h, w, y, reduction=reduction)
        assert loss.dtype == torch.float32
        outs[name] = (loss, *torch.autograd.grad(loss * 1.7, (h, w)))
    for ours, theirs, exact in zip(outs["fastmath"], outs["torch"], ref):
        exact = exact.detach()
        err = (ours.detach().double() - exact).abs().max()
        torch_err = (theirs.detach().double() - exact).abs().max()
        assert err <= 2 * torch_err + 1e-5 * max(1.0, float(exact.abs().max())), (float(err), float(torch_err))


def test_all_ignored_gives_zero_and_zero_grads():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0 and not torch.isnan(loss)
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_forced_reference_and_no_grad_use_the_reference(monkeypatch):
    calls = []
    original = FLCE.fused_linear_cross_entropy_ref
    monkeypatch.setattr(FLCE, "fused_linear_cross_entropy_ref", lambda *a, **k: calls.append(1) or original(*a, **k))
    h, w, y = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.tensor([1, 2, 3, 4])
    fused_linear_cross_entropy(h, w, y)
    assert calls == []  # chunked path
    with torch.no_grad():
        fused_linear_cross_entropy(h, w, y)
    monkeypatch.setenv("FASTMATH_KERNELS", "0")
    fused_linear_cross_entropy(h, w, y)
    assert calls == [1, 1]
