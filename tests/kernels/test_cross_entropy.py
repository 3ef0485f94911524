"""Cross-entropy kernel against an fp64 reference (loss and dlogits), "mean" and "sum", ignored labels."""
import pytest
import torch
import torch.nn.functional as F

from fastmath.kernels import cross_entropy, cross_entropy_ref

IGNORE = -100


def cross_entropy_fp64(logits, labels, ignore_index=IGNORE, reduction="mean"):
    loss = F.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum()
    return loss / max(n_valid.item(), 1) if reduction == "mean" else loss


def make_case(n_rows, vocab, dtype, device, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    labels[torch.rand(n_rows, generator=g) < ignore_frac] = IGNORE
    return logits, labels.to(device)


def check(kt, logits, labels, reduction, grad_scale=1.0, dtype=None):
    grad_out = torch.tensor(grad_scale, device=logits.device)
    out, (dl,) = kt.forward_backward(cross_entropy, (logits,), labels, IGNORE, reduction, grad_out=grad_out)
    t_out, (t_dl,) = kt.forward_backward(cross_entropy_ref, (logits,), labels, IGNORE, reduction, grad_out=grad_out)
    r_out, (r_dl,) = kt.forward_backward(cross_entropy_fp64, (logits.double(),), labels, IGNORE, reduction,
                                         grad_out=grad_out.double())
    assert out.dtype == torch.float32 and out.dim() == 0
    kt.assert_matches("loss", out, t_out, r_out, dtype or torch.float32)
    kt.assert_matches("dlogits", dl, t_dl, r_dl, dtype or logits.dtype)


@pytest.mark.parametrize("n_rows,vocab", [(1, 7), (5, 123), (3, 32000), (200, 1000), (2, 40000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_fp64(n_rows, vocab, dtype, reduction, kt, triton_only):
    logits, labels = make_case(n_rows, vocab, dtype, kt.device)
    if n_rows > 1:
        labels[0] = IGNORE
        labels[1] = vocab - 1  # the last column, in the masked tail of the last block
    kt.require_triton(logits, labels)
    check(kt, logits, labels, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_grad_output_scaling(reduction, kt, triton_only):
    logits, labels = make_case(9, 300, torch.float32, kt.device, seed=1)
    kt.require_triton(logits, labels)
    check(kt, logits, labels, reduction, grad_scale=0.37)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_all_ignored_is_zero(reduction, kt, triton_only):
    logits, _ = make_case(4, 50, torch.bfloat16, kt.device)
    labels = torch.full((4,), IGNORE, device=kt.device)
    kt.require_triton(logits, labels)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels, IGNORE, reduction)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_autocast_and_no_grad(kt, triton_only):
    logits, labels = make_case(6, 257, torch.bfloat16, kt.device, seed=2)
    kt.require_triton(logits, labels)
    with torch.autocast(kt.device, dtype=torch.bfloat16):
        check(kt, logits, labels, "mean")
    with torch.no_grad():
        loss = cross_entropy(logits.clone().requires_grad_(), labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - cross_entropy_fp64(logits, labels).item()) < 1e-4


def test_cross_entropy_rejects_bad_reduction(kt, triton_only):
    logits, labels = make_case(2, 8, torch.float32, kt.device)
    kt.require_triton(logits, labels)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="none")
