"""Every attention backend present equals a dense reference with a block-diagonal causal mask."""
import math

import pytest
import torch

from fastmath import attention
from fastmath.attention import KVCache, decode_attention, sdpa_varlen, torch_varlen_call, varlen_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dense_reference(q, k, v, cu_seqlens):
    """fp64 attention over the whole pack with an explicit block-diagonal causal mask."""
    T, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu())
    idx = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])  # (T, T)
    s = torch.einsum("thd,shd->hts", q.double().cpu(), k.double().cpu()) / math.sqrt(D)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v.double().cpu())


def make_pack(lengths, H=4, Hkv=2, D=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[7], [3, 1, 9, 5], [4, 4, 4]])
def test_backends_match_dense_reference(device, lengths):
    q, k, v, cu = make_pack(lengths, device=device)
    ref = dense_reference(q, k, v, cu)
    for backend in attention.available_backends(device):
        out = varlen_attention(q, k, v, cu, max(lengths), backend=backend)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5 if device == "cpu" else 2e-2, rtol=0)


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("FASTMATH_ATTENTION", "flash")
    with pytest.raises(RuntimeError, match="FASTMATH_ATTENTION=flash cannot run here"):
        attention.select_backend("cpu")
    monkeypatch.setenv("FASTMATH_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="not one of"):
        attention.select_backend("cpu")
    monkeypatch.setenv("FASTMATH_ATTENTION", "torch")
    assert attention.select_backend("cpu") == "torch"


@pytest.mark.parametrize("signature", ["is_causal", "window_size"])
def test_torch_varlen_both_signatures(signature):
    """varlen_attn took `is_causal` in torch 2.10/2.11 and `window_size`/`enable_gqa` later: a stub of
    each signature, computing with the dense reference, receives the right arguments."""
    calls = []

    if signature == "is_causal":
        def stub(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
            calls.append(dict(is_causal=is_causal, heads=key.shape[1]))
            assert is_causal
            return dense_reference(query, key, value, cu_seq_q).to(query.dtype)
    else:
        def stub(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None):
            calls.append(dict(window=window_size, gqa=enable_gqa, heads=key.shape[1]))
            assert window_size == (-1, 0)
            return dense_reference(query, key, value, cu_seq_q).to(query.dtype)

    q, k, v, cu = make_pack([5, 3])
    out = torch_varlen_call(stub, q, k, v, cu, 5, None)
    torch.testing.assert_close(out, sdpa_varlen(q, k, v, cu), atol=1e-5, rtol=0)
    # Without enable_gqa the KV heads are repeated to the query heads.
    assert calls[0]["heads"] == (4 if signature == "is_causal" else 2)
    if signature == "window_size":
        assert calls[0]["gqa"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_matches_reference(device):
    B, S, H, Hkv, D = 3, 10, 4, 2, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g).to(device)
    kc, vc = (torch.randn(B, S, Hkv, D, generator=g).to(device) for _ in range(2))
    lens = torch.tensor([1, 6, 10], dtype=torch.int32, device=device)
    out = decode_attention(q, kc, vc, lens)
    for b, n in enumerate(lens.tolist()):
        # the new token is the last of a causal document of length n: the reference's last row
        qq = torch.cat([torch.zeros(n - 1, H, D, device=device), q[b : b + 1]])
        ref = dense_reference(qq, kc[b, :n], vc[b, :n], torch.tensor([0, n]))[-1]
        torch.testing.assert_close(out[b].double().cpu(), ref, atol=2e-5, rtol=0)


def test_kv_cache_prefill_then_decode_equals_full_attention():
    lengths = [4, 7]
    q, k, v, cu = make_pack([5, 8])  # each sequence: its prompt plus one decoded token
    cache = KVCache(1, 2, 16, 2, 16, torch.float32, "cpu")
    cache.prefill(torch.tensor(lengths))
    pq, pk, pv = (torch.cat([x[0:4], x[5:12]]) for x in (q, k, v))
    pre = cache.attend(0, pq, pk, pv)
    cache.advance()
    cache.decode()
    dec = cache.attend(0, q[[4, 12]], k[[4, 12]], v[[4, 12]])
    ref = dense_reference(q, k, v, cu)
    torch.testing.assert_close(pre.double(), torch.cat([ref[0:4], ref[5:12]]), atol=2e-5, rtol=0)
    torch.testing.assert_close(dec.double(), ref[[4, 12]], atol=2e-5, rtol=0)


def _stub_varlen(attend):
    def stub(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False):
        return attend(query, key, value, cu_seq_q)
    return stub


class _BrokenBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("function _varlen_attn_backward returned an incorrect number of gradients")


@pytest.mark.parametrize("kind", ["good", "backward_raises", "wrong_numbers"])
def test_torch_varlen_self_check(kind, monkeypatch):
    """A torch release whose varlen_attn fails or disagrees with SDPA (forward or backward) is not used."""
    good = lambda q, k, v, cu: sdpa_varlen(q, k, v, cu)  # noqa: E731
    attend = {
        "good": good,
        "backward_raises": lambda q, k, v, cu: _BrokenBackward.apply(good(q, k, v, cu)),
        # no causal mask inside documents: the forward differs
        "wrong_numbers": lambda q, k, v, cu: torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                *(x[s:e].transpose(0, 1) for x in (q, k, v)), enable_gqa=True).transpose(0, 1)
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]),
    }[kind]
    monkeypatch.setattr(attention, "_torch_varlen", lambda: _stub_varlen(attend))
    attention.torch_varlen_works.cache_clear()
    try:
        if kind == "good":
            assert attention.torch_varlen_works("cpu") is True
        else:
            with pytest.warns(RuntimeWarning, match="failed its self-check"):
                assert attention.torch_varlen_works("cpu") is False
    finally:
        attention.torch_varlen_works.cache_clear()
