"""Attention behind two calls: packed varlen (training, prefill) and KV-cache decode.

Backends: flash-attn, xformers and torch. `auto` takes the best one available for the tensors' device;
FASTMATH_ATTENTION=flash|xformers|torch forces one (a clear error if it cannot run). The torch backend
uses `torch.nn.attention.varlen.varlen_attn` on CUDA where present, otherwise SDPA per document with
`is_causal=True` (one batched call when all documents have the same length); it never builds a (T, T)
mask over a whole pack.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "xformers", "torch")
HALF = (torch.float16, torch.bfloat16)  # the fused CUDA kernels (flash-attn, xformers, varlen_attn) take only these


@functools.cache
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def _torch_varlen():
    """torch's varlen_attn (CUDA only, torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _has("flash_attn"):
            found.append("flash")
        if _has("xformers"):
            found.append("xformers")
    found.append("torch")
    return found


def select_backend(device: torch.device | str) -> str:
    """The backend for tensors on `device`: FASTMATH_ATTENTION if set, else the best available."""
    forced = os.environ.get("FASTMATH_ATTENTION", "auto").strip().lower() or "auto"
    avail = available_backends(device)
    if forced == "auto":
        return avail[0]
    if forced not in BACKENDS:
        raise ValueError(f"FASTMATH_ATTENTION={forced!r} is not one of auto, {', '.join(BACKENDS)}")
    if forced not in avail:
        why = "needs CUDA tensors" if torch.device(device).type != "cuda" else f"`{forced}` is not installed (pip install .[gpu])"
        raise RuntimeError(f"FASTMATH_ATTENTION={forced} cannot run here: it {why}")
    return forced


def describe_backends() -> str:
    """One line for `fastmath info`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = select_backend(device)
    except (RuntimeError, ValueError) as e:
        return f"error: {e}"
    detail = ""
    if chosen == "torch":
        use_varlen = device == "cuda" and _torch_varlen() is not None and torch_varlen_works("cuda")
        detail = " (varlen_attn)" if use_varlen else " (SDPA per document)"
    return f"{chosen}{detail} on {device}; available: {', '.join(available_backends(device))}"


# ----------------------------------------------------------------------------------------------------------
# packed varlen attention


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float | None = None, backend: str | None = None):
    """Causal attention within each packed document.

    Args:
        q: (T, n_heads, D); k, v: (T, n_kv_heads, D); n_heads a multiple of n_kv_heads (GQA).
        cu_seqlens: (n_docs + 1,) int32 document boundaries, starting at 0 and ending at T.
        max_seqlen: the longest document (a Python int).
    Returns:
        (T, n_heads, D) in q.dtype.
    """
    backend = backend or select_backend(q.device)
    if q.dtype not in HALF:  # fp32 (tests, CPU training): SDPA computes it exactly
        return sdpa_varlen(q, k, v, cu_seqlens, softmax_scale)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=softmax_scale, causal=True)
    if backend == "xformers":
        return _xformers_varlen(q, k, v, cu_seqlens, softmax_scale)
    if q.is_cuda and _torch_varlen() is not None and torch_varlen_works(str(q.device)):
        return torch_varlen_call(_torch_varlen(), q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    return sdpa_varlen(q, k, v, cu_seqlens, softmax_scale)


@functools.cache
def torch_varlen_works(device: str) -> bool:
    """Probe torch's varlen_attn once per device: forward and backward on a tiny bf16 pack (two documents,
    GQA) must match SDPA per document. A release whose op fails or disagrees (its backward was still being
    fixed after it shipped) is replaced by SDPA per document, with one warning."""
    import warnings

    fn = _torch_varlen()
    if fn is None:
        return False
    try:
        with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(24, h, 64, generator=g, device=device).to(torch.bfloat16) for h in (4, 2, 2))
            cu = torch.tensor([0, 9, 24], dtype=torch.int32, device=device)
            grad_out = torch.randn(24, 4, 64, generator=g, device=device).to(torch.bfloat16)
            results = []
            for attend in (lambda q, k, v: torch_varlen_call(fn, q, k, v, cu, 15, None),
                           lambda q, k, v: sdpa_varlen(q, k, v, cu)):
                leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
                out = attend(*(x.to(torch.bfloat16) for x in leaves))
                out.backward(grad_out)
                results.append([out.float()] + [x.grad for x in leaves])
        for name, ours, ref in zip(("output", "dq", "dk", "dv"), *results):
            if ours.shape != ref.shape or not torch.allclose(ours, ref, atol=5e-2, rtol=5e-2):
                raise AssertionError(f"{name} differs from SDPA by {(ours - ref).abs().max().item():.3g}")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        warnings.warn(f"torch varlen_attn failed its self-check on {device} ({type(e).__name__}: {e}); "
                      "using SDPA per document instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def _repeat_kv(x, n_rep: int):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=-2)  # (T, n_kv * n_rep, D)


def _xformers_varlen(q, k, v, cu_seqlens, softmax_scale):
    from xformers.ops import fmha

    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
    n_rep = q.shape[1] // k.shape[1]
    out = fmha.memory_efficient_attention(q[None], _repeat_kv(k, n_rep)[None], _repeat_kv(v, n_rep)[None],
                                          attn_bias=bias, scale=softmax_scale)
    return out[0]


def torch_varlen_call(fn, q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """Call torch's varlen_attn whichever signature the installed torch has.

    torch 2.10/2.11 take `is_causal=`; later versions take `window_size=(-1, 0)` for causal and
    `enable_gqa=`. Where GQA is not supported the KV heads are repeated.
    """
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn has neither is_causal nor window_size")
    if softmax_scale is not None:
        kwargs["scale"] = softmax_scale
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def sdpa_varlen(q, k, v, cu_seqlens, softmax_scale=None):
    """SDPA per document (is_causal=True); one batched call when all documents have the same length."""
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    gqa = q.shape[1] != k.shape[1]
    if len(set(lengths)) == 1:
        n, L = len(lengths), lengths[0]
        qb, kb, vb = (x.view(n, L, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[s:e].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=softmax_scale, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------------------------------------
# KV-cache decode


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale: float | None = None, backend: str | None = None):
    """One new query token per sequence against its cache.

    Args:
        q: (B, n_heads, D) the new tokens' queries.
        k_cache, v_cache: (B, S, n_kv_heads, D), already holding the new tokens' keys and values.
        cache_seqlens: (B,) int32, valid cache length per sequence including the new token.
    Returns:
        (B, n_heads, D).
    """
    backend = backend or select_backend(q.device)
    if backend == "flash" and q.dtype in HALF:
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=cache_seqlens.to(torch.int32),
                                      softmax_scale=softmax_scale, causal=True)
        return out[:, 0]
    # torch (and xformers, whose decode path brings nothing here): SDPA with a length mask over the
    # longest valid prefix only.
    S = int(cache_seqlens.max())
    kb, vb = k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2)  # (B, Hkv, S, D)
    mask = torch.arange(S, device=q.device)[None, :] < cache_seqlens[:, None].to(q.device)  # (B, S)
    out = F.scaled_dot_product_attention(q[:, :, None], kb, vb, attn_mask=mask[:, None, None, :], scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[2])
    return out[:, :, 0]


class KVCache:
    """A contiguous KV cache for a batch of sequences (what `model.generate` uses).

    The model calls `cache.attend(layer_id, q, k, v)` from each attention layer; the cache stores the
    new keys/values and returns the attention output. Before each forward the caller says what the
    tokens are: `prefill(lengths)` (packed prompts, one per sequence) or `decode()` (one token per
    sequence); `advance()` after the forward moves the lengths on.

    Shapes: k, v (n_layers, B, max_len, n_kv_heads, D).
    """

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (n_layers, batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.max_len = max_len
        self._new = None  # (B,) tokens added by the current forward
        self._cu = None

    def prefill(self, lengths: torch.Tensor):
        """The next forward holds sum(lengths) packed prompt tokens, sequence b's at cache position 0.."""
        assert int(self.lengths.max()) == 0, "prefill on a non-empty cache"
        if int(lengths.max()) > self.max_len:
            raise ValueError(f"prompt of {int(lengths.max())} tokens does not fit a cache of {self.max_len}")
        self._new = lengths.to(torch.int32)
        self._cu = F.pad(torch.cumsum(self._new, 0, dtype=torch.int32), (1, 0))

    def decode(self):
        if int(self.lengths.max()) + 1 > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self._new = None

    def attend(self, layer_id: int, q, k, v):
        """q (T, H, D), k/v (T, Hkv, D) for the current forward -> (T, H, D)."""
        if self._new is not None:  # prefill: store each prompt, attend within it
            for b, (s, e) in enumerate(zip(self._cu[:-1].tolist(), self._cu[1:].tolist())):
                self.k[layer_id, b, : e - s] = k[s:e]
                self.v[layer_id, b, : e - s] = v[s:e]
            return varlen_attention(q, k, v, self._cu, int(self._new.max()))
        idx = self.lengths.long()  # decode: write at the current length of every sequence
        rows = torch.arange(q.shape[0], device=q.device)
        self.k[layer_id, rows, idx] = k
        self.v[layer_id, rows, idx] = v
        return decode_attention(q, self.k[layer_id], self.v[layer_id], self.lengths + 1)

    def advance(self):
        self.lengths += self._new if self._new is not None else 1
        self._new = None
