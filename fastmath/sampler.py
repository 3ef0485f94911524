"""Batched sampling of many answers per prompt: shared-prefix KV cache and continuous batching.

How a run goes (`Sampler.run`):
- Each prompt is prefilled ONCE into a *prefix pool* entry; its logits at the last position give the first
  token of every one of its samples. The n samples of a prompt never hold a copy of the prompt's keys
  and values: each decode step attends to the one shared prefix (all samples of a prompt at once, a
  matmul with many queries) and to its own *suffix* (the tokens it generated), and the two partial
  attentions are merged exactly through their log-sum-exps (Hydragen / FlashInfer cascade attention).
- A fixed number of *slots* hold sequences being decoded; the active slots are always 0..B-1, so a step
  runs the model on exactly the B live sequences (no padding, no finished rows). A sequence that stops
  frees its slot at once and the next pending sample (of this prompt or the next) takes it; when nothing
  is pending, the last slots move into the holes.
- Each token's sampling noise is Gumbel noise from a counter-based hash of (seed, problem index, sample
  index, step, token id), so samples do not depend on the slot, the batch or the number of slots (up to
  floating-point batch effects in the logits).
- Stops: EOS, `max_new_tokens`, a completed "The answer is: ..." line, and optional stop strings (only
  tokens that can end one trigger a text check, so the hot path has no per-slot Python).
- Memory: the KV budget (free CUDA memory, or a CPU default, or `kv_cache_gb`) fixes the slot count
  before the run starts, so a run never runs out of KV memory midway.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .attention import varlen_attention

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


class SharedPrefixKVCache:
    """Preallocated KV cache: a prefix pool (one entry per prompt) and one suffix per slot.

    Implements the model's cache protocol: before a forward the caller declares what the packed tokens
    are (`prefill(entries, lengths)`: whole prompts into pool entries; `decode(...)`: one token for each of
    the slots 0..B-1), the model calls `attend(layer_id, q, k, v)` from every layer, then `advance()`.

    Shapes: pk/pv (n_layers, P, Hkv, prefix_capacity, D); sk/sv (n_layers, n_slots, Hkv, suffix_capacity, D).
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, n_prefixes, prefix_capacity, n_slots, suffix_capacity,
                 dtype, device):
        self.pk = torch.zeros(n_layers, n_prefixes, n_kv_heads, prefix_capacity, head_dim, dtype=dtype, device=device)
        self.pv = torch.zeros_like(self.pk)
        self.sk = torch.zeros(n_layers, n_slots, n_kv_heads, suffix_capacity, head_dim, dtype=dtype, device=device)
        self.sv = torch.zeros_like(self.sk)
        self.prefix_len = torch.zeros(n_prefixes, dtype=torch.int64, device=device)
        self.suffix_len = torch.zeros(n_slots, dtype=torch.int64, device=device)
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
        self._mode = "decode"

    def attend(self, layer_id: int, q, k, v):
        """q (T, H, D), k/v (T, Hkv, D) of the current forward -> (T, H, D)."""
        if self._mode == "prefill":
            self.pk[layer_id, self._entry_idx, :, self._pos_idx] = k
            self.pv[layer_id, self._entry_idx, :, self._pos_idx] = v
            return varlen_attention(q, k, v, self._cu, self._max)
        B, S = self._B, self._S
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
        self._mode = None

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, max_len: int):
        """Copy slots src -> dst (suffix keys/values up to max_len, and lengths): compaction."""
        self.sk[:, dst, :, :max_len] = self.sk[:, src, :, :max_len]
        self.sv[:, dst, :, :max_len] = self.sv[:, src, :, :max_len]
        self.suffix_len[dst] = self.suffix_len[src]


# ----------------------------------------------------------------------------------------------------------
# Counter-based sampling noise

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32).

    The products can exceed 2^63; int64 multiplication wraps in two's complement, so the low 32 bits
    kept by the mask are exact.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_keys(seed: int, problems: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(N,) int64 key per (seed, problem index, sample index); combine with the step by `step_keys`."""
    k = _mix32(torch.full_like(problems, (seed * 0x9E3779B1 + 0x632BE5AB) & _M32))
    k = _mix32(k ^ (problems & _M32))
    return _mix32(k ^ (samples & _M32))


def step_keys(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    return _mix32(keys ^ _mix32((steps + 0x5BD1E995) & _M32))


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (N, V') fp32 for rows `keys` (N,) and tokens `token_ids` (V',) or (N, V').

    A pure function of (key, token id): the same for a token whatever else is in the batch.
    """
    tok = _mix32((token_ids.long() * 0x9E3779B9 + 0x7F4A7C15) & _M32)
    if tok.dim() == 1:
        tok = tok[None, :]
    h = _mix32((keys[:, None] + tok) & _M32)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row by the Gumbel-max trick with counter-based noise.

    Args:
        logits: (N, V) fp32. keys: (N,) int64 from `step_keys`.
        temperature: <= 0 means greedy for every row. top_p: nucleus mass (1 = off). top_k: 0 = off.
        greedy: (N,) bool rows to decode greedily whatever the settings.
    Returns:
        (N,) int64 token ids.
    """
    N, V = logits.shape
    argmax = logits.argmax(-1)
    if temperature <= 0:
        return argmax
    z = logits / temperature
    if top_k and top_k < V:
        vals, ids = z.topk(top_k, dim=-1)  # (N, k): noise only for the candidates
        if top_p < 1.0:
            vals = _nucleus_mask(vals, top_p, already_sorted=True)
        pick = (vals + gumbel_noise(keys, ids)).argmax(-1)
        out = ids.gather(1, pick[:, None])[:, 0]
    else:
        if top_p < 1.0:
            z = _nucleus_mask(z, top_p)
        out = (z + gumbel_noise(keys, torch.arange(V, device=logits.device))).argmax(-1)
    return torch.where(greedy, argmax, out) if greedy is not None else out


def _nucleus_mask(z: torch.Tensor, top_p: float, already_sorted: bool = False) -> torch.Tensor:
    """-inf outside the smallest set of highest-probability tokens whose mass reaches top_p."""
    if already_sorted:
        sz, order = z, None
    else:
        sz, order = z.sort(dim=-1, descending=True)
    probs = torch.softmax(sz, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    drop = before >= top_p
    drop[:, 0] = False
    if order is None:
        return sz.masked_fill(drop, float("-inf"))
    return z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


# ----------------------------------------------------------------------------------------------------------
# Settings and results


@dataclass
class SamplingParams:
    """What to sample.

    n: samples per prompt. temperature: 0 = greedy. top_p: nucleus mass (1 = off). top_k: 0 = off.
    greedy: also decode one greedy completion per prompt (first-answer accuracy), sharing the prefill.
    stop_at_answer: stop after a completed "The answer is: ..." line. stop_strings: extra stop strings
    (the text is cut before them).
    """

    n: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int = 0
    greedy: bool = False
    stop_at_answer: bool = True
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.n < 0 or (self.n == 0 and not self.greedy):
            raise ValueError(f"n must be >= 1 (or 0 with greedy), got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_strings = tuple(s for s in self.stop_strings if s)

    @property
    def per_prompt(self) -> int:
        return self.n + int(self.greedy)


@dataclass
class Completion:
    tokens: list[int]  # generated ids up to and including the stop token (EOS or the answer line's newline)
    text: str  # decoded text, without EOS, cut after the answer line / before a stop string
    finish_reason: str  # "eos" | "answer" | "stop" | "length"


@dataclass
class ProblemSamples:
    index: int  # the problem index given to `run` (global, e.g. the line in the data file)
    prompt_tokens: int
    samples: list[Completion]  # in sample order 0..n-1
    greedy: Completion | None = None


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


# ----------------------------------------------------------------------------------------------------------
# The engine

_ANSWER_LINE = re.compile(r"The answer is:?\s*\S")


@dataclass
class _Problem:
    index: int
    prompt: list[int]
    entry: int = -1
    next_sample: int = 0  # next sample index to give a slot
    outstanding: int = 0
    results: dict = field(default_factory=dict)


class Sampler:
    """Sample many completions per prompt with a shared-prefix KV cache and continuous batching.

    Args:
        model: a fastmath Transformer (or anything with `.args` and the packed cache call).
        tokenizer: fastmath Tokenizer (EOS id, decoding and stop checks).
        kv_cache_gb: KV budget in GiB (default: free CUDA memory, or 1.5 GiB on CPU).
        max_slots: upper bound on concurrent sequences (default 256 on CPU, 2048 on CUDA).
        prefill_tokens: most prompt tokens prefilled in one forward.
    """

    def __init__(self, model, tokenizer, kv_cache_gb: float | None = None, max_slots: int | None = None,
                 prefill_tokens: int = 8192):
        self.model = model.eval()
        self.args = model.args
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.vocab_limit = min(self.args.vocab_size, tokenizer.vocab_size)
        self.kv_cache_gb = kv_cache_gb
        self.max_slots = max_slots or (2048 if self.device.type == "cuda" else 256)
        self.prefill_tokens = prefill_tokens
        self._trigger_cache = {}
        self.stats = {"generated_tokens": 0, "decode_steps": 0, "slot_steps": 0, "prefill_tokens": 0}
        self.plan: MemoryPlan | None = None

    # -- helpers ------------------------------------------------------------------------------------------

    def _trigger_mask(self, chars: frozenset) -> np.ndarray:
        """(V,) bool: tokens whose text contains one of `chars` (only those can complete a stop)."""
        if chars not in self._trigger_cache:
            V = self.args.vocab_size
            mask = np.zeros(V, dtype=bool)
            for i in range(min(V, self.tokenizer.vocab_size)):
                piece = self.tokenizer.id_to_piece(i)
                text = "\n" if piece == "<0x0A>" else piece.replace("\u2581", " ")
                mask[i] = any(c in text for c in chars)
            self._trigger_cache[chars] = mask
        return self._trigger_cache[chars]

    def _finish_text(self, tokens: list[int], params: SamplingParams) -> tuple[str, str | None]:
        """(text, reason) where reason is "answer"/"stop" if a stop completed, else None."""
        body = tokens[:-1] if tokens and tokens[-1] == self.eos_id else tokens
        text = self.tokenizer.decode(body)
        cut, reason = len(text), None
        if params.stop_at_answer:
            lines = text.split("\n")
            pos = 0
            for line in lines[:-1]:  # completed lines only
                if _ANSWER_LINE.search(line):
                    cut, reason = pos + len(line), "answer"
                    break
                pos += len(line) + 1
        for s in params.stop_strings:
            i = text.find(s)
            if 0 <= i < cut:
                cut, reason = i, "stop"
        return text[:cut], reason

    # -- the run ------------------------------------------------------------------------------------------

    def prepare(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                indices: Sequence[int] | None = None) -> MemoryPlan:
        """The memory plan for these prompts (slot count, prefix pool); a clear error when one cannot fit."""
        indices = list(range(len(prompts))) if indices is None else list(indices)
        budget = int(self.kv_cache_gb * 2**30) if self.kv_cache_gb else default_kv_budget(self.device)
        longest = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        try:
            plan = plan_memory(self.args, self.dtype, budget, len(prompts[longest]), params.max_new_tokens,
                               params.per_prompt, len(prompts), self.max_slots)
        except ValueError as e:
            raise ValueError(f"problem {indices[longest]}: {e}") from None
        self.plan = plan
        return plan

    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
            indices: Sequence[int] | None = None) -> Iterator[ProblemSamples]:
        """Sample `params.n` (+1 greedy) completions for each prompt; yield each problem when all its samples end.

        Args:
            prompts: token ids per prompt (BOS included).
            indices: the global problem index of each prompt (seeds the noise; default 0..N-1), so a shard
                or a resumed run draws the same samples as a full run.
        Yields:
            ProblemSamples, in completion order (roughly the input order).
        """
        if not prompts:
            return
        indices = list(range(len(prompts))) if indices is None else list(indices)
        if len(indices) != len(prompts):
            raise ValueError("indices and prompts differ in length")
        for i, p in zip(indices, prompts):
            if len(p) == 0:
                raise ValueError(f"problem {i}: empty prompt")
        plan = self.prepare(prompts, params, indices)
        with torch.inference_mode():
            cache = SharedPrefixKVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim, plan.n_prefixes,
                                        plan.prefix_capacity, plan.n_slots, plan.suffix_capacity, self.dtype, self.device)
        state = _RunState(self, cache, plan, params, [_Problem(i, list(p)) for i, p in zip(indices, prompts)])
        while not state.done():
            yield from state.step()


class _RunState:
    """Host-side bookkeeping of one `Sampler.run` (slots 0..B-1 are the live sequences)."""

    def __init__(self, sampler: Sampler, cache: SharedPrefixKVCache, plan: MemoryPlan, params: SamplingParams,
                 problems: list[_Problem]):
        self.s, self.cache, self.plan, self.params = sampler, cache, plan, params
        self.pending = problems[::-1]  # stack: next problem at the end
        self.open: list[_Problem] = []  # prefilled problems with samples left to start or running
        dev, n = sampler.device, plan.n_slots
        self.dev = dev
        self.B = 0
        self.slot_problem: list[_Problem | None] = [None] * n
        self.slot_sample = np.zeros(n, dtype=np.int64)
        self.slot_entry = np.zeros(n, dtype=np.int64)
        self.gen = np.zeros((n, params.max_new_tokens), dtype=np.int64)  # generated tokens per slot
        self.n_gen = np.zeros(n, dtype=np.int64)
        self.next_tok = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_key = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_greedy = torch.zeros(n, dtype=torch.bool, device=dev)
        self.free_entries = list(range(plan.n_prefixes))[::-1]
        self.entry_logits = torch.zeros(plan.n_prefixes, sampler.args.vocab_size, dtype=torch.float32, device=dev)
        self.entry_len = np.zeros(plan.n_prefixes, dtype=np.int64)
        chars = frozenset(["\n"] if params.stop_at_answer else []) | frozenset(s[-1] for s in params.stop_strings)
        self.trigger = sampler._trigger_mask(chars) if chars else None
        self.finished: list[ProblemSamples] = []

    def done(self) -> bool:
        return not self.pending and not self.open and self.B == 0

    # -- prefill and admission ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, want: int):
        """Prefill up to `want` pending problems (pool entries and the token budget permitting)."""
        batch, total = [], 0
        while self.pending and self.free_entries and len(batch) < want:
            prob = self.pending[-1]
            if batch and total + len(prob.prompt) > self.s.prefill_tokens:
                break
            self.pending.pop()
            prob.entry = self.free_entries.pop()
            batch.append(prob)
            total += len(prob.prompt)
        if not batch:
            return
        lengths = [len(p.prompt) for p in batch]
        tokens = torch.tensor([t for p in batch for t in p.prompt], dtype=torch.int64, device=self.dev)
        positions = torch.cat([torch.arange(n, device=self.dev) for n in lengths])
        last = torch.cumsum(torch.tensor(lengths, device=self.dev), 0) - 1
        entries = [p.entry for p in batch]
        self.cache.prefill(entries, lengths)
        logits = self.s.model(tokens, positions=positions, cache=self.cache, logits_index=last)  # (n, V)
        self.cache.advance()
        self.entry_logits[torch.tensor(entries, device=self.dev)] = logits.float()
        for p, n in zip(batch, lengths):
            self.entry_len[p.entry] = n
            p.outstanding = self.params.per_prompt
        self.s.stats["prefill_tokens"] += total
        self.open.extend(batch)

    def _admit(self, holes: list[int]):
        """Fill free slots (holes below B first, then B..) with pending samples; compact what stays free."""
        params = self.params
        holes = sorted(holes, reverse=True)  # pop() gives the lowest hole
        while True:
            n_free = len(holes) + self.plan.n_slots - self.B
            if n_free == 0:
                break
            take = []  # (problem, sample index)
            for prob in self.open:
                while prob.next_sample < params.per_prompt and len(take) < n_free:
                    take.append((prob, prob.next_sample))
                    prob.next_sample += 1
                if len(take) == n_free:
                    break
            if not take:
                if self.pending and self.free_entries:
                    self._prefill(math.ceil(n_free / params.per_prompt))
                    continue
                break
            slots = []
            for prob, j in take:
                if holes:
                    slot = holes.pop()
                else:
                    slot = self.B
                    self.B += 1
                slots.append(slot)
                self.slot_problem[slot] = prob
                self.slot_sample[slot] = j
                self.slot_entry[slot] = prob.entry
            holes.extend(self._start(np.array(slots), take))
            holes.sort(reverse=True)  # pop() gives the lowest hole
        self._compact(holes)

    @torch.inference_mode()
    def _start(self, slots: np.ndarray, take) -> list[int]:
        """First token of new samples from their prompt's logits; returns slots that already finished."""
        params, dev = self.params, self.dev
        slots_t = torch.from_numpy(slots).to(dev)
        probs = torch.tensor([p.index for p, _ in take], dtype=torch.int64, device=dev)
        samples = torch.tensor([j for _, j in take], dtype=torch.int64, device=dev)
        self.slot_key[slots_t] = sample_keys(params.seed, probs, samples)
        self.slot_greedy[slots_t] = samples >= params.n
        self.cache.suffix_len[slots_t] = 0
        self.n_gen[slots] = 0
        logits = self.entry_logits[torch.from_numpy(self.slot_entry[slots]).to(dev)]
        return self._accept(slots, slots_t, logits)

    # -- one decode step ----------------------------------------------------------------------------------

    def step(self) -> list[ProblemSamples]:
        self._admit([])
        if self.B:
            holes = self._decode()
            self._admit(holes)
        out, self.finished = self.finished, []
        return out

    @torch.inference_mode()
    def _decode(self) -> list[int]:
        B, dev = self.B, self.dev
        entries = self.slot_entry[:B]
        entry_t = torch.from_numpy(entries).to(dev)
        groups = None
        uniq = np.unique(entries)
        if len(uniq) <= 8:  # few prompts live: read each prefix once for all its sequences
            groups = []
            for e in uniq:
                rows = np.nonzero(entries == e)[0]
                groups.append((int(e), None if len(rows) == B else torch.from_numpy(rows).to(dev),
                               int(self.entry_len[e])))
        self.cache.decode(B, entry_t, int(self.n_gen[:B].max()) - 1, groups)
        positions = self.cache.prefix_len[entry_t] + self.cache.suffix_len[:B]
        logits = self.s.model(self.next_tok[:B], positions=positions, cache=self.cache)  # (B, V)
        self.cache.advance()
        self.s.stats["decode_steps"] += 1
        self.s.stats["slot_steps"] += B
        slots = np.arange(B)
        return self._accept(slots, torch.arange(B, device=dev), logits)

    def _accept(self, slots: np.ndarray, slots_t: torch.Tensor, logits: torch.Tensor) -> list[int]:
        """Sample the next token for `slots` from `logits` (len(slots), V); record stops; return freed slots."""
        params, s = self.params, self.s
        steps = torch.from_numpy(self.n_gen[slots]).to(self.dev)
        keys = step_keys(self.slot_key[slots_t], steps)
        logits = logits.float()
        if s.vocab_limit < logits.shape[1]:  # ids the tokenizer cannot decode (a padded embedding) are never drawn
            logits[:, s.vocab_limit:] = float("-inf")
        new = sample_tokens(logits, keys, params.temperature, params.top_p, params.top_k,
                            self.slot_greedy[slots_t])
        self.next_tok[slots_t] = new
        new_np = new.cpu().numpy()
        self.gen[slots, self.n_gen[slots]] = new_np
        self.n_gen[slots] += 1
        s.stats["generated_tokens"] += len(slots)
        eos = new_np == s.eos_id
        length = self.n_gen[slots] >= params.max_new_tokens
        check = self.trigger[new_np] & ~eos if self.trigger is not None else np.zeros(len(slots), bool)
        freed = []
        for i in np.nonzero(eos | length | check)[0]:
            slot = int(slots[i])
            toks = self.gen[slot, : self.n_gen[slot]].tolist()
            text, reason = s._finish_text(toks, params)
            if reason is None and not (eos[i] or length[i]):
                continue  # a newline without a completed answer line
            reason = reason or ("eos" if eos[i] else "length")
            self._record(slot, Completion(toks, text, reason))
            freed.append(slot)
        return freed

    def _record(self, slot: int, c: Completion):
        prob = self.slot_problem[slot]
        self.slot_problem[slot] = None
        prob.results[int(self.slot_sample[slot])] = c
        prob.outstanding -= 1
        if prob.outstanding == 0:
            self.open.remove(prob)
            self.free_entries.append(prob.entry)
            n = self.params.n
            self.finished.append(ProblemSamples(prob.index, len(prob.prompt), [prob.results[j] for j in range(n)],
                                                prob.results.get(n)))

    @torch.inference_mode()
    def _compact(self, holes: list[int]):
        """Move the last live slots into the holes so that slots 0..B-1 stay the live ones."""
        holes = set(h for h in holes if h < self.B)
        if not holes:
            return
        new_B = self.B - len(holes)
        dst = sorted(h for h in holes if h < new_B)
        src = [i for i in range(new_B, self.B) if i not in holes]  # live slots beyond the new end
        if src:
            src_np, dst_np = np.array(src), np.array(dst)
            src_t, dst_t = torch.from_numpy(src_np).to(self.dev), torch.from_numpy(dst_np).to(self.dev)
            self.cache.move_slots(src_t, dst_t, int(self.n_gen[src_np].max()))
            for a, b in zip(src, dst):
                self.slot_problem[b], self.slot_problem[a] = self.slot_problem[a], None
            for arr in (self.slot_sample, self.slot_entry, self.n_gen):
                arr[dst_np] = arr[src_np]
            self.gen[dst_np] = self.gen[src_np]
            for t in (self.next_tok, self.slot_key, self.slot_greedy):
                t[dst_t] = t[src_t]
        self.B = new_B


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the Python API behind `fastmath sample`


def evaluate(model: str = "runs/latest", data: str | None = None, out: str | None = None, n: int = 256,
             temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 512, seed: int = 0,
             greedy: bool = False, problems: int | None = None, template: str | None = None, fewshot: int = 0,
             stop_at_answer: bool = True, kv_cache_gb: float | None = None, max_slots: int | None = None,
             device: str = "auto", dtype: str = "auto", progress: bool = True, log=print) -> dict:
    """Sample, grade and summarise: samples.jsonl (as problems finish), summary.json, pass_at_k.png.

    Args: as `fastmath sample` (see its --help). Resumes an existing `out` folder made with the same
    arguments; under torchrun each rank samples every world-th remaining problem and rank 0 merges.
    Returns:
        the summary dict on rank 0, None on other ranks (which write only their samples shard).
    Raises:
        sample_io.SampleError / ValueError with a one-sentence message for bad inputs.
    """
    import time

    from tqdm import tqdm

    from . import distributed as dist_mod
    from . import fsio, metrics
    from . import sample_io as io
    from .checkpoint import load_model
    from .data import render_prompt
    from .tokenizer import Tokenizer

    ckpt, run_dir = io.resolve_model(model)
    cfg = io.run_config(run_dir)
    template = template or cfg.get("template") or "vicuna"
    render_prompt("x", template)  # a bad template is an error before anything runs
    probs, data_desc = io.load_problems(data, problems, cfg)
    out_dir = Path(out) if out else (run_dir or ckpt) / "eval"
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed, greedy=greedy, stop_at_answer=stop_at_answer)

    dist = dist_mod.init(device)
    torch_dtype = {"auto": torch.bfloat16 if dist.device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    run_args = {"model": str(ckpt), "data": data_desc, "n": n, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "greedy": greedy,
                "template": template, "fewshot": fewshot, "stop_at_answer": stop_at_answer,
                "dtype": str(torch_dtype).replace("torch.", "")}
    if dist.is_main:
        io.check_run_args(out_dir, run_args)
    dist_mod.barrier(dist)
    if not dist.is_main:
        io.check_run_args(out_dir, run_args)  # same verdict on every rank (rank 0 wrote the file)
    done = io.all_records(out_dir)
    dist_mod.barrier(dist)  # everyone has read what is finished before anyone appends
    todo = [p for p in probs if p.index not in done]
    mine = [probs[i] for i in io.my_share([p.index for p in todo], dist.rank, dist.world_size)]
    if dist.is_main and done:
        log(f"resuming {out_dir}: {len(probs) - len(todo)} of {len(probs)} problems already sampled")

    seconds, tokens = 0.0, 0
    if mine:
        net = load_model(ckpt, device=dist.device, dtype=torch_dtype)
        tok = Tokenizer(ckpt)
        tok.check_model_vocab(net.args.vocab_size)
        prompts = io.encode_prompts(tok, mine, template, fewshot)
        by_index = {p.index: p for p in mine}
        sampler = Sampler(net, tok, kv_cache_gb=kv_cache_gb, max_slots=max_slots)
        plan = sampler.prepare(prompts, params, [p.index for p in mine])  # fails now, not after the bar starts
        if dist.is_main:
            log(f"{plan.n_slots} slots, {plan.n_prefixes} prompt entries, KV cache {_size(plan.cache_bytes)} "
                f"on {dist.device}")
        shard = out_dir / io.shard_name(dist.rank, dist.world_size)
        io.repair_tail(shard)
        bar = tqdm(total=len(mine), unit="problem", desc="sampling", disable=not (progress and dist.is_main),
                   dynamic_ncols=True)
        t0, grading = time.perf_counter(), 0.0  # tokens/s counts sampling time only, not grading
        unchecked = False
        # whole lines only (a full disk: StorageError, after the bar is closed)
        with fsio.AppendFile(shard, hint=io.RESUME_HINT) as f, bar:
            for res in sampler.run(prompts, params, indices=[p.index for p in mine]):
                tg = time.perf_counter()
                p = by_index[res.index]
                g = res.greedy
                rec = metrics.problem_record(
                    p.id, p.question, p.answer, [c.text for c in res.samples], [len(c.tokens) for c in res.samples],
                    greedy_completion=g.text if g else None, greedy_token_count=len(g.tokens) if g else None,
                    type=p.type, level=p.level, index=p.index, prompt_tokens=res.prompt_tokens,
                    finish_reasons=[c.finish_reason for c in res.samples])
                if not metrics.validate(rec, "samples", optional=True) and not unchecked:
                    unchecked = True
                    log("jsonschema is not installed: samples.jsonl and summary.json are written without a schema check")
                f.append(json.dumps(rec) + "\n")
                grading += time.perf_counter() - tg
                elapsed = time.perf_counter() - t0 - grading
                bar.update(1)
                bar.set_postfix_str(f"{sampler.stats['generated_tokens'] / max(elapsed, 1e-9):,.0f} tok/s, "
                                    f"{sampler.plan.n_slots} slots")
        bar.close()
        seconds, tokens = time.perf_counter() - t0 - grading, sampler.stats["generated_tokens"]
    if dist.enabled:  # all ranks' tokens; the wall time is the slowest rank's
        t = torch.tensor([float(tokens), seconds], dtype=torch.float64)
        import torch.distributed as tdist

        tdist.all_reduce(t[:1])
        tdist.all_reduce(t[1:], op=tdist.ReduceOp.MAX)
        tokens, seconds = int(t[0]), float(t[1])
    dist_mod.barrier(dist)
    summary = None
    if dist.is_main:
        timing = io.add_timing(out_dir, seconds, tokens)
        recs = {int(r["index"]): r for r in io.merge_shards(out_dir)}
        chosen = [recs[p.index] for p in probs if p.index in recs]
        missing = len(probs) - len(chosen)
        if missing:
            raise io.SampleError(f"{out_dir}: {missing} problems have no samples after the run")
        summary = metrics.summarize(chosen, n=n, seconds=timing["seconds"] or None,
                                    generated_tokens=timing["generated_tokens"])
        summary.update({"model": str(ckpt), "data": data_desc, "temperature": temperature, "top_p": top_p,
                        "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed})
        metrics.validate(summary, "summary", optional=True)
        fsio.atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2), hint=io.RESUME_HINT)
        try:
            io.plot_pass_at_k(summary, out_dir / "pass_at_k.png", title=f"{ckpt.parent.name}/{ckpt.name}")
        except ImportError as e:  # matplotlib is a declared dependency, but a --no-deps install may lack it
            log(f"pass_at_k.png skipped: {e}")
    dist_mod.teardown(dist)
    return summary
