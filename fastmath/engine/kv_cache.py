"""KV caches and the memory plan of the engine.

- `SharedPrefixKVCache`: a prefix pool (one entry per prompt, prefilled once) and one suffix per slot; a
  decode step attends to the shared prefix and to the slot's own suffix and merges the two attentions
  exactly through their log-sum-exps (Hydragen / FlashInfer cascade attention).
- Two decode modes: `decode` (eager: shapes follow the live batch and the longest suffix; prefixes read once
  per prompt for all its samples) and `decode_static` (the compilable step: a fixed slot bucket, the whole
  suffix and prefix capacities under length masks, no host synchronisation).
- `plan_memory`: the slot count and prefix pool that fit a KV budget, fixed before anything runs, so a run
  never runs out of KV memory midway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..attention import varlen_attention

# ----------------------------------------------------------------------------------------------------------
# Attention over one shared prefix plus per-sequence suffixes


def attention_with_lse(q, k, v, lengths=None, scale: float | None = None, bias=None):
    """Attention of single queries over keys/values, also returning the log-sum-exp of the scores.

    Args:
        q: (N, Hkv, R, D): R query heads per KV head (GQA).
        k, v: (N, Hkv, S, D).
        lengths: (N,) valid keys per row (keys at >= length are ignored); None means all S.
        bias: (N, S) additive fp32 mask (0 or -inf), instead of `lengths` (built once, reused by every layer).
    Returns:
        out (N, Hkv, R, D) in q.dtype, lse (N, Hkv, R) fp32 (about -1e30 where a row has no valid key).
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # (N, Hkv, R, S)
    if bias is None and lengths is not None:
        bias = length_bias(lengths, k.shape[-2])
    if bias is not None:
        scores.add_(bias[:, None, None, :])
    m = scores.amax(dim=-1, keepdim=True).clamp_min_(-1e30)  # finite even for a row without keys
    p = scores.sub_(m).exp_()  # in place: one (N, Hkv, R, S) buffer
    denom = p.sum(dim=-1, keepdim=True).clamp_min_(1e-30)
    out = torch.matmul(p.to(v.dtype), v).div_(denom.to(v.dtype))
    return out, (m + denom.log()).squeeze(-1)


def length_bias(lengths, S: int):
    """(N, S) fp32: 0 for the first lengths[i] keys of row i, -inf after."""
    pos = torch.arange(S, device=lengths.device)[None, :]
    return torch.zeros(pos.shape[1], device=lengths.device).expand(len(lengths), S).masked_fill(
        pos >= lengths[:, None], float("-inf"))


def merge_attention(o1, lse1, o2, lse2):
    """Exact merge of two attentions of the same queries over disjoint key sets.

    softmax over the union = each part weighted by exp(lse_i - lse), lse = logaddexp(lse1, lse2).
    Args: o1, o2 (..., D); lse1, lse2 (...) fp32 (-inf for an empty part). Returns (out (..., D), lse (...)).
    """
    lse = torch.logaddexp(lse1, lse2)
    safe = lse.nan_to_num(neginf=0.0)
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse


def shared_prefix_decode_attention(q, prefix_k, prefix_v, prefix_len, slot_prefix, suffix_k, suffix_v, suffix_len,
                                   groups=None, scale: float | None = None, suffix_bias=None, prefix_bias=None):
    """One new query per sequence over its (shared) prefix plus its own suffix.

    Args:
        q: (B, H, D) queries of the new tokens.
        prefix_k, prefix_v: (P, Hkv, Lp, D) the prefix pool (one entry per prompt).
        prefix_len: (P,) valid tokens of each pool entry.
        slot_prefix: (B,) int64 pool entry of each sequence.
        suffix_k, suffix_v: (B, Hkv, S, D) each sequence's own tokens (the new token's key/value included).
        suffix_len: (B,) valid suffix tokens per sequence (including the new one).
        groups: [(entry, rows (n,) int64 or None for all rows)] the sequences of each pool entry: the prefix
            is read once per entry for all its sequences. None: gather each sequence's prefix (for many
            small groups, e.g. one sample per prompt).
        suffix_bias, prefix_bias: optional precomputed `length_bias` of suffix_len / the gathered prefixes.
    Returns:
        (B, H, D) in q.dtype.
    """
    B, H, D = q.shape
    Hkv = prefix_k.shape[1]
    R = H // Hkv
    qg = q.view(B, Hkv, R, D)
    o_s, lse_s = attention_with_lse(qg, suffix_k, suffix_v, suffix_len, scale, suffix_bias)
    if groups is None:
        Lmax = int(prefix_len[slot_prefix].max()) if prefix_bias is None else prefix_bias.shape[1]
        kp = prefix_k[slot_prefix, :, :Lmax]  # (B, Hkv, Lmax, D)
        vp = prefix_v[slot_prefix, :, :Lmax]
        o_p, lse_p = attention_with_lse(qg, kp, vp, prefix_len[slot_prefix], scale, prefix_bias)
    else:
        o_p = torch.empty_like(o_s)
        lse_p = torch.empty_like(lse_s)
        for entry, rows, length in groups:
            qr = qg if rows is None else qg.index_select(0, rows)  # (n, Hkv, R, D)
            n = qr.shape[0]
            # all n sequences' queries against the one prefix: (Hkv, n*R, D) @ (Hkv, D, L)
            qh = qr.permute(1, 0, 2, 3).reshape(1, Hkv, n * R, D)
            o, lse = attention_with_lse(qh, prefix_k[entry, :, :length][None], prefix_v[entry, :, :length][None],
                                        None, scale)
            o = o.view(Hkv, n, R, D).permute(1, 0, 2, 3)
            lse = lse.view(Hkv, n, R).permute(1, 0, 2)
            if rows is None:
                o_p, lse_p = o, lse
            else:
                o_p.index_copy_(0, rows, o)
                lse_p.index_copy_(0, rows, lse)
    out, _ = merge_attention(o_p, lse_p, o_s, lse_s)
    return out.reshape(B, H, D)


class SharedPrefixKVCache(torch.nn.Module):
    """Preallocated KV cache: a prefix pool (one entry per prompt) and one suffix per slot.

    Implements the model's cache protocol: before a forward the caller declares what the packed tokens
    are (`prefill(entries, lengths)`: whole prompts into pool entries; `decode(...)`: one token for each of
    the slots 0..B-1), the model calls `attend(layer_id, q, k, v)` from every layer, then `advance()`.

    Shapes: pk/pv (n_layers, P, Hkv, prefix_capacity, D); sk/sv (n_layers, n_slots, Hkv, suffix_capacity, D).
    A module only so that its tensors are buffers: a compiled decode step (CUDA graphs) then treats them as
    static inputs that it may update in place.
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, n_prefixes, prefix_capacity, n_slots, suffix_capacity,
                 dtype, device):
        super().__init__()
        pk = torch.zeros(n_layers, n_prefixes, n_kv_heads, prefix_capacity, head_dim, dtype=dtype, device=device)
        sk = torch.zeros(n_layers, n_slots, n_kv_heads, suffix_capacity, head_dim, dtype=dtype, device=device)
        for name, t in (("pk", pk), ("pv", torch.zeros_like(pk)), ("sk", sk), ("sv", torch.zeros_like(sk)),
                        ("prefix_len", torch.zeros(n_prefixes, dtype=torch.int64, device=device)),
                        ("suffix_len", torch.zeros(n_slots, dtype=torch.int64, device=device))):
            self.register_buffer(name, t, persistent=False)
        self.prefix_capacity, self.suffix_capacity = prefix_capacity, suffix_capacity
        self.device = torch.device(device)
        self._mode = None

    @staticmethod
    def bytes_per_token(n_layers, n_kv_heads, head_dim, dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def prefill(self, entries: Sequence[int], lengths: Sequence[int]):
        """The next forward holds the packed prompts `lengths`, prompt i going to pool entry entries[i]."""
        if max(lengths) > self.prefix_capacity:
            raise ValueError(f"prompt of {max(lengths)} tokens does not fit the prefix capacity {self.prefix_capacity}")
        dev = self.device
        lens = torch.tensor(lengths, dtype=torch.int64, device=dev)
        self._entry_idx = torch.repeat_interleave(torch.tensor(entries, dtype=torch.int64, device=dev), lens)  # (T,)
        self._pos_idx = torch.cat([torch.arange(n, device=dev) for n in lengths])  # (T,)
        self._cu = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
        self._max = max(lengths)
        self.prefix_len[torch.tensor(entries, device=dev)] = lens
        self._mode = "prefill"

    def decode(self, batch: int, slot_prefix: torch.Tensor, max_suffix: int, groups=None):
        """The next forward holds one token for each slot 0..batch-1, written at its suffix length.

        slot_prefix: (batch,) pool entry per slot; max_suffix: max suffix length over the batch (host int);
        groups: see `shared_prefix_decode_attention`.
        """
        if max_suffix + 1 > self.suffix_capacity:
            raise ValueError(f"suffix cache of {self.suffix_capacity} positions is full")
        self._B, self._slot_prefix, self._S, self._groups = batch, slot_prefix, max_suffix + 1, groups
        self._rows = torch.arange(batch, device=self.device)
        # the masks are the same in every layer: build them once per step
        self._suffix_bias = length_bias(self.suffix_len[:batch] + 1, self._S)
        self._prefix_bias = None
        if groups is None:
            plen = self.prefix_len[slot_prefix]
            self._prefix_bias = length_bias(plen, int(plen.max()))
        self._pos = None
        self._mode = "decode"

    def decode_static(self, slot_prefix: torch.Tensor, live: torch.Tensor):
        """The next forward holds one token for each slot of a fixed bucket 0..Bb-1 (the compilable step).

        slot_prefix: (Bb,) pool entry per slot; live: (Bb,) bool, False for padding rows (free slots: their
        keys/values go to position 0 of their own suffix, which a new sample overwrites). Attends over the
        whole suffix and prefix capacities under length masks: the shapes depend on Bb only, and nothing
        here reads a tensor back to the host.
        """
        Bb = live.shape[0]
        self._B, self._slot_prefix, self._groups = Bb, slot_prefix, None
        self._S, self._live = self.suffix_capacity, live
        self._rows = torch.arange(Bb, device=self.device)
        self._pos = torch.where(live, self.suffix_len[:Bb], 0)
        self._suffix_bias = length_bias(self._pos + 1, self.suffix_capacity)
        self._prefix_bias = length_bias(self.prefix_len[slot_prefix], self.prefix_capacity)
        self._mode = "static"

    def attend(self, layer_id: int, q, k, v):
        """q (T, H, D), k/v (T, Hkv, D) of the current forward -> (T, H, D)."""
        if self._mode == "prefill":
            self.pk[layer_id, self._entry_idx, :, self._pos_idx] = k
            self.pv[layer_id, self._entry_idx, :, self._pos_idx] = v
            return varlen_attention(q, k, v, self._cu, self._max)
        B, S = self._B, self._S
        if self._mode == "static":
            # one index_put_ on the whole buffer (no view of it): torch.compile updates it in place, where a
            # write through a view would copy the whole cache every step
            pos = self._pos
            idx = (torch.full_like(pos, layer_id)[:, None], self._rows[:, None],
                   torch.arange(k.shape[1], device=k.device)[None, :], pos[:, None])  # broadcast to (Bb, Hkv)
            self.sk.index_put_(idx, k)
            self.sv.index_put_(idx, v)
        else:
            pos = self.suffix_len[:B]
            self.sk[layer_id, self._rows, :, pos] = k  # (B, Hkv, D) at each slot's suffix length
            self.sv[layer_id, self._rows, :, pos] = v
        return shared_prefix_decode_attention(
            q, self.pk[layer_id], self.pv[layer_id], self.prefix_len, self._slot_prefix,
            self.sk[layer_id, :B, :, :S], self.sv[layer_id, :B, :, :S], pos + 1, self._groups,
            suffix_bias=self._suffix_bias, prefix_bias=self._prefix_bias)

    def advance(self):
        if self._mode == "decode":
            self.suffix_len[: self._B] += 1
        elif self._mode == "static":
            self.suffix_len[: self._B] += self._live.long()
        self._mode = None

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, max_len: int):
        """Copy slots src -> dst (suffix keys/values up to max_len, and lengths): compaction."""
        self.sk[:, dst, :, :max_len] = self.sk[:, src, :, :max_len]
        self.sv[:, dst, :, :max_len] = self.sv[:, src, :, :max_len]
        self.suffix_len[dst] = self.suffix_len[src]



@dataclass
class MemoryPlan:
    n_slots: int
    n_prefixes: int
    prefix_capacity: int
    suffix_capacity: int
    bytes_per_token: int
    budget_bytes: int

    @property
    def cache_bytes(self) -> int:
        return self.bytes_per_token * (self.n_slots * self.suffix_capacity + self.n_prefixes * self.prefix_capacity)


DEFAULT_CPU_KV_GB = 1.5  # CPU: enough for hundreds of slots of the small models, far below host memory


def default_kv_budget(device: torch.device, weights_bytes: int = 0) -> int:
    """Bytes for the KV cache: most of the free CUDA memory (minus room for activations), or a CPU default."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * 0.92) - 3 * 2**30)
    return int(DEFAULT_CPU_KV_GB * 2**30)


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


SAMPLING_BYTES_PER_LOGIT = 48  # fp32 logits + int64 hash temporaries + Gumbel noise, per slot and vocab entry


def plan_memory(args, dtype, budget_bytes: int, max_prompt_len: int, max_new_tokens: int, per_prompt: int,
                n_prompts: int, max_slots: int) -> MemoryPlan:
    """The largest slot count whose suffixes plus the prefix pool (plus per-slot sampling buffers) fit.

    Prefix pool entries: about two prompts' worth of slots plus a margin for stragglers (a prompt stays
    in the pool until its last sample ends), at most one per slot and per prompt.
    """
    bpt = SharedPrefixKVCache.bytes_per_token(args.n_layers, args.n_kv_heads, args.head_dim, dtype)
    per_slot = max_new_tokens * bpt + SAMPLING_BYTES_PER_LOGIT * args.vocab_size

    def n_prefixes(s):
        return max(1, min(n_prompts, s, 2 * math.ceil(s / per_prompt) + 4))

    def need(s):
        return s * per_slot + n_prefixes(s) * max_prompt_len * bpt

    if need(1) > budget_bytes:
        raise ValueError(
            f"a prompt of {max_prompt_len} tokens plus {max_new_tokens} new tokens needs "
            f"{_size(need(1))} of KV cache, but the budget is {_size(budget_bytes)}: "
            "raise --kv-cache-gb, lower --max-new-tokens or shorten the prompt")
    s = max(1, min(max_slots, n_prompts * per_prompt, budget_bytes // per_slot))
    while s > 1 and need(s) > budget_bytes:
        s -= 1
    return MemoryPlan(s, n_prefixes(s), max_prompt_len, max_new_tokens, bpt, budget_bytes)


