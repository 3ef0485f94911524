"""The engine: a stream of requests, continuously batched over a shared-prefix KV cache.

How a request goes:
- `add_request` checks that it can ever fit (else EngineError) and queues it.
- `step()` admits work: while slots are free, the next samples of open requests take them; when no open
  request has samples left to start, waiting requests are prefilled (each prompt ONCE, into a prefix-pool
  entry; its last logits give the first token of every one of its samples). Then one decode step runs the
  model on the B live slots (slots 0..B-1: no padding, no finished rows), draws each slot's next token with
  its request's settings, and checks stops. A finished sample frees its slot at once for the next one.
- Noise: each token's Gumbel noise is a hash of (seed, noise key, sample index, step, token id), so a
  request's samples do not depend on the slot, on the slot count or on the other requests in the batch
  (up to floating-point batch effects in the logits).
- Stops: EOS (unless ignore_eos), stop token ids, max_new_tokens, a completed "The answer is: ..." line
  (stop_at_answer) and stop strings; only tokens that can complete a text stop trigger a text check, so the
  hot path has no per-slot Python.

The decode step has two forms: eager (shapes follow the live batch and the longest suffix; each prompt's
prefix read once for all its samples) and static (`decode_step`: a few slot-count buckets, whole-capacity
attention under masks, no host synchronisation), which `compile=True` compiles with torch.compile (CUDA
graphs via mode="reduce-overhead" on CUDA).
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .kv_cache import MemoryPlan, SharedPrefixKVCache, default_kv_budget, plan_memory
from .sampling import (SamplingParams, logprob_dicts, prompt_noise_key, sample_keys, sample_tokens,
                       sample_tokens_rows, seed_word, step_keys, token_logprobs)
from .scheduler import Scheduler

_ANSWER_LINE = re.compile(r"The answer is:?\s*\S")


class EngineError(ValueError):
    """A request that can never be served (the message names the parameter and says why)."""


def window_refusal(what: str, window: int) -> str:
    """The refusal of a context longer than a model's sliding window (`what`: "max_model_len 8192", ...)."""
    return (f"{what} is more than the model's sliding_window of {window}: fastmath attends over the whole "
            f"context, which equals the model's windowed attention only up to {window} tokens; use at most "
            f"{window} (e.g. --max-model-len {window})")


@dataclass
class SampleOutput:
    index: int  # 0..n-1 (the greedy extra: index n)
    new_token_ids: list[int]  # generated in this step
    # All generated so far. While the sample runs these are the engine's own growing lists, not copies (copying
    # them at every step costs O(L^2) per sample); the finishing output carries copies that stay fixed.
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # aligned with token_ids: chosen token + top-k, raw distribution
    finished: bool
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    stop_reason: str | int | None  # "eos" | "answer" | the matched stop string | the stop token id
    text: str | None  # when finished: without EOS / stop token, cut after the answer line / before a stop string


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None  # in the request's first output only
    outputs: list[SampleOutput]  # the samples that changed in this step
    finished: bool  # all samples finished


@dataclass(eq=False)
class _Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    reported: int = 0  # tokens already given in an output
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    legacy_reason: str | None = None  # Sampler's Completion.finish_reason: eos | answer | stop | length
    text: str | None = None


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    noise_key: int
    per_prompt: int
    group: int  # sampling-settings group (rows of one group are drawn in one call)
    rule: int  # stop-rule id
    samples: dict = field(default_factory=dict)  # sample index -> _Sample
    prompt_logprobs: list | None = None
    sent_first: bool = False
    n_finished: int = 0
    # kept by the scheduler
    entry: int = -1
    next_sample: int = 0
    outstanding: int = 0


@dataclass
class _Rule:
    trigger: np.ndarray | None  # (V,) bool: tokens that can complete a text stop
    stop_ids: np.ndarray  # stop token ids (besides EOS)
    eos: bool  # EOS ends a sample


def decode_step(model, cache: SharedPrefixKVCache, tokens, slot_prefix, live, keys, steps, temperature, top_p, top_k,
                greedy, vocab_limit: int, filtered: bool):
    """One decode step of a fixed bucket of Bb slots: model forward, vocabulary mask and the draw.

    No host synchronisation and shapes that depend on Bb only, so torch.compile can capture it whole
    (CUDA graphs). Args are (Bb,) tensors (see `SharedPrefixKVCache.decode_static` and `sample_tokens_rows`);
    keys are the slots' sample keys and steps their generated-token counts.
    Returns: (new tokens (Bb,) int64, logits (Bb, V) fp32).
    """
    cache.decode_static(slot_prefix, live)
    positions = cache.prefix_len[slot_prefix] + cache.suffix_len[: live.shape[0]]
    logits = model(tokens, positions=positions, cache=cache).float()
    cache.advance()
    V = logits.shape[1]
    if vocab_limit < V:  # ids the tokenizer cannot decode (a padded embedding) are never drawn
        logits = logits.masked_fill(torch.arange(V, device=logits.device) >= vocab_limit, float("-inf"))
    new = sample_tokens_rows(logits, step_keys(keys, steps), temperature, top_p, top_k, greedy, filtered)
    return new, logits


class Engine:
    """Continuous batching of a request stream over a shared-prefix KV cache (see the module docstring).

    Args:
        model: a fastmath Transformer (or anything with `.args` and the packed cache call).
        tokenizer: fastmath Tokenizer (EOS id, decoding and stop checks).
        kv_cache_gb: KV budget in GiB (default: free CUDA memory, or 1.5 GiB on CPU).
        max_slots: most sequences decoded at once (default 256 on CPU, 2048 on CUDA; memory permitting).
        max_model_len: most prompt + new tokens of a request (default: model.args.max_seq_len, capped at the
            model's sliding_window when it has one; a larger value given is refused).
        compile: decode with the static step compiled by torch.compile (mode reduce-overhead on CUDA).
        max_prompt_len, max_new_tokens: the prefix and suffix capacities (default max_model_len - 1 each);
            a caller that knows its requests (fastmath sample) gives them and gets more slots.
        per_prompt, n_prompts: expected samples per request and requests, to size the prefix pool.
        plan: a ready memory plan (overrides the above).
        stream: step() reports every sample's new tokens; False reports samples only when they finish
            (no per-token host work; fastmath sample).
        buckets: slot-count buckets of the static step (default: powers of two from 8 up to the slot count).
        prefill_tokens: most prompt tokens prefilled in one forward.
        static_step: decode with the static step (default: when compiling); True without compile runs it
            eagerly (to test and debug it).
    """

    def __init__(self, model, tokenizer, kv_cache_gb: float | None = None, max_slots: int | None = None,
                 max_model_len: int | None = None, compile: bool = False, *, max_prompt_len: int | None = None,
                 max_new_tokens: int | None = None, per_prompt: int = 1, n_prompts: int | None = None,
                 plan: MemoryPlan | None = None, stream: bool = True, buckets=None, prefill_tokens: int = 8192,
                 static_step: bool | None = None):
        self.model = model.eval()
        self.args = model.args
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        # every id of the EOS set ends a sample (LLaMA-3.1-Instruct has three); plain tokenizers have one
        self.eos_ids = np.array(sorted(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id}), dtype=np.int64)
        self.vocab_limit = min(self.args.vocab_size, tokenizer.vocab_size)
        self.max_model_len = int(max_model_len or self.args.max_seq_len)
        if self.max_model_len < 2:
            raise EngineError(f"max_model_len must be >= 2, got {self.max_model_len}")
        # A sliding-window model (Mistral v0.1: 4096) attends over the whole cache here, which is its attention
        # only while no sequence is longer than the window: the context stops at the window.
        self.sliding_window = getattr(self.args, "sliding_window", None)
        if self.sliding_window is not None:
            if max_model_len is not None and self.max_model_len > self.sliding_window:
                raise EngineError(window_refusal(f"max_model_len {self.max_model_len}", self.sliding_window))
            self.max_model_len = min(self.max_model_len, self.sliding_window)
        self.max_slots = max_slots or (2048 if self.device.type == "cuda" else 256)
        self.stream = stream
        if plan is None:
            budget = int(kv_cache_gb * 2**30) if kv_cache_gb else default_kv_budget(self.device)
            try:
                plan = plan_memory(self.args, self.dtype, budget, max_prompt_len or self.max_model_len - 1,
                                   max_new_tokens or self.max_model_len - 1, per_prompt, n_prompts or self.max_slots,
                                   self.max_slots)
            except ValueError as e:
                raise EngineError(str(e)) from None
        self.plan = plan
        n, dev = plan.n_slots, self.device
        with torch.inference_mode():
            self.cache = SharedPrefixKVCache(self.args.n_layers, self.args.n_kv_heads, self.args.head_dim,
                                             plan.n_prefixes, plan.prefix_capacity, n, plan.suffix_capacity,
                                             self.dtype, dev)
            self.entry_logits = torch.zeros(plan.n_prefixes, self.args.vocab_size, dtype=torch.float32, device=dev)
            # per-slot device state
            self.next_tok = torch.zeros(n, dtype=torch.int64, device=dev)
            self.slot_key = torch.zeros(n, dtype=torch.int64, device=dev)
            self.slot_greedy = torch.zeros(n, dtype=torch.bool, device=dev)
            self.slot_temp = torch.zeros(n, dtype=torch.float32, device=dev)  # the static step's settings
            self.slot_top_p = torch.ones(n, dtype=torch.float32, device=dev)
            self.slot_top_k = torch.zeros(n, dtype=torch.int64, device=dev)
        # per-slot host state
        self.gen = np.zeros((n, plan.suffix_capacity), dtype=np.int64)  # generated tokens
        self.n_gen = np.zeros(n, dtype=np.int64)
        self.slot_max = np.zeros(n, dtype=np.int64)
        self.slot_group = np.zeros(n, dtype=np.int64)
        self.slot_rule = np.zeros(n, dtype=np.int64)
        self.slot_lp = np.full(n, -1, dtype=np.int64)  # logprobs top-k, -1 = none
        self.entry_len = np.zeros(plan.n_prefixes, dtype=np.int64)
        self.sched = Scheduler(n, plan.n_prefixes, prefill_tokens)
        self._requests: dict[str, _Request] = {}
        self._groups: dict[tuple, int] = {}  # (temperature, top_p, top_k) -> group id
        self._group_sig: list[tuple] = []
        self._rules: dict[tuple, int] = {}
        self._rule_list: list[_Rule] = []
        self._trigger_cache: dict[frozenset, np.ndarray] = {}
        self._touched: dict[_Request, set] = {}
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "decode_steps": 0, "slot_steps": 0}
        self.buckets = sorted(set(min(b, n) for b in (buckets or _pow2_buckets(n))) | {n})
        self._step_fn = None
        self.compiled = compile
        if compile or static_step:
            self._step_fn = functools.partial(decode_step, self.model, self.cache)
        if compile:  # gpt-fast's recipe: CUDA graphs on CUDA; fixed shapes per bucket, so no dynamic shapes
            graphs = 2 * len(self.buckets) + 4  # one graph per bucket, with and without top-p/top-k filters
            for name in ("cache_size_limit", "recompile_limit"):
                if getattr(torch._dynamo.config, name, graphs) < graphs:
                    setattr(torch._dynamo.config, name, graphs)
            mode = "reduce-overhead" if dev.type == "cuda" else None
            if dev.type == "cuda":  # CUDA graphs update the cache in place only in tensors at fixed addresses
                for t in self.cache.buffers():
                    torch._dynamo.mark_static_address(t)
            self._step_fn = torch.compile(self._step_fn, mode=mode, dynamic=False)

    # -- the request API ------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids, params: SamplingParams, noise_key: int | None = None) -> None:
        """Queue a request (see ENGINE_API.md). Raises EngineError when it can never be served."""
        if request_id in self._requests:
            raise EngineError(f"request_id {request_id!r} is already running")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EngineError("prompt_ids is empty: a prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise EngineError(f"prompt_ids holds {bad[0]}, outside the model's vocabulary 0..{self.args.vocab_size - 1}")
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be a SamplingParams, got {type(params).__name__}")
        L, M = len(prompt), params.max_new_tokens
        if L + M > self.max_model_len:
            why = (" (the model's sliding_window: fastmath runs sliding-window models only up to the window)"
                   if self.max_model_len == self.sliding_window else "")
            raise EngineError(f"a prompt of {L} tokens plus max_tokens={M} is {L + M} tokens, more than the "
                              f"model's context of {self.max_model_len} (max_model_len){why}")
        if L > self.plan.prefix_capacity:
            raise EngineError(f"a prompt of {L} tokens is longer than the {self.plan.prefix_capacity} tokens the KV "
                              "memory plan holds per prompt")
        if M > self.plan.suffix_capacity:
            raise EngineError(f"max_tokens={M} is more than the {self.plan.suffix_capacity} new tokens the KV memory "
                              "plan holds per sample")
        if noise_key is None:
            noise_key = prompt_noise_key(prompt)
        if not isinstance(noise_key, (int, np.integer)) or not 0 <= noise_key < 2**63:
            raise EngineError(f"noise_key must be an integer in [0, 2^63), got {noise_key!r}")
        seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(31)
        sig = (float(params.temperature), float(params.top_p), int(params.top_k))
        group = self._groups.setdefault(sig, len(self._groups))
        if group == len(self._group_sig):
            self._group_sig.append(sig)
        req = _Request(request_id, prompt, params, int(seed), int(noise_key), params.per_prompt, group,
                       self._rule_id(params))
        self._requests[request_id] = req
        self.sched.add(req)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its slots and prefix entry; an unknown (or finished) id is a no-op."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self._touched.pop(req, None)
        holes = self.sched.remove(req)
        self._compact(sorted(holes, reverse=True))

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> dict:
        running = sum(1 for r in self._requests.values() if r.entry >= 0)
        return {"running": running, "waiting": len(self._requests) - running, "slots_in_use": self.sched.B,
                "max_slots": self.plan.n_slots, "generated_tokens": self.counters["generated_tokens"],
                "prompt_tokens": self.counters["prompt_tokens"]}

    def step(self) -> list[RequestOutput]:
        """One iteration: admit and prefill what fits, one decode step of all live samples, stops.

        Returns an output for every request with new tokens (stream=True) or finished samples in this step.
        """
        self._admit([])
        if self.sched.B:
            holes = self._decode()
            self._admit(holes)
        return self._collect()

    # -- stop rules and text --------------------------------------------------------------------------------

    def _trigger_mask(self, chars: frozenset) -> np.ndarray:
        """(V,) bool: tokens whose text contains one of `chars` (only those can complete a stop)."""
        if chars not in self._trigger_cache:
            V = self.args.vocab_size
            mask = np.zeros(V, dtype=bool)
            token_bytes = getattr(self.tokenizer, "token_bytes", None)
            for i in range(min(V, self.tokenizer.vocab_size)):
                if token_bytes is not None:  # SentencePiece pieces and byte-level BPE alike
                    text = token_bytes(i).decode("utf-8", "replace")
                else:
                    piece = self.tokenizer.id_to_piece(i)
                    text = "\n" if piece == "<0x0A>" else piece.replace("\u2581", " ")
                mask[i] = any(c in text for c in chars)
            self._trigger_cache[chars] = mask
        return self._trigger_cache[chars]

    def _rule_id(self, params: SamplingParams) -> int:
        key = (params.stop_at_answer, params.stop_strings, params.stop_token_ids, params.ignore_eos)
        if key not in self._rules:
            chars = frozenset(["\n"] if params.stop_at_answer else []) | frozenset(s[-1] for s in params.stop_strings)
            self._rules[key] = len(self._rule_list)
            self._rule_list.append(_Rule(self._trigger_mask(chars) if chars else None,
                                         np.array(sorted(set(params.stop_token_ids)), dtype=np.int64),
                                         not params.ignore_eos))
        return self._rules[key]

    def finish_text(self, tokens: list[int], params: SamplingParams, drop_last: bool) -> tuple[str, str | None, str | None]:
        """(text, reason, matched stop string): reason "answer"/"stop" if a text stop completed, else None."""
        body = tokens[:-1] if drop_last else tokens
        text = self.tokenizer.decode(body)
        cut, reason, matched = len(text), None, None
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
                cut, reason, matched = i, "stop", s
        return text[:cut], reason, matched

    # -- prefill and admission ------------------------------------------------------------------------------

    def _admit(self, holes: list[int]):
        """Fill free slots (holes below B first, then B..) with samples to start; compact what stays free."""
        sched = self.sched
        holes = sorted(holes, reverse=True)  # pop() gives the lowest hole
        while True:
            n_free = len(holes) + sched.n_free
            if n_free == 0:
                break
            take = sched.take(n_free)
            if not take:
                batch = sched.next_prefill(n_free)
                if batch:
                    self._prefill(batch)
                    continue
                break
            slots = sched.place(take, holes)
            holes.extend(self._start(slots, take))
            holes.sort(reverse=True)
        self._compact(holes)

    @torch.inference_mode()
    def _prefill(self, batch: list[_Request]):
        """Prefill the prompts of `batch` into their pool entries (logits of the last position; of every position
        for requests that want prompt log-probs)."""
        dev = self.device
        lengths = [len(r.prompt) for r in batch]
        tokens = torch.tensor([t for r in batch for t in r.prompt], dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
        ends = np.cumsum(lengths)
        want_all = [r.params.prompt_logprobs is not None for r in batch]
        if any(want_all):
            rows, last = [], []  # rows of the packed stream whose logits are needed; the last of each prompt
            for r, n, e, a in zip(batch, lengths, ends.tolist(), want_all):
                rows.extend(range(e - n, e) if a else [e - 1])
                last.append(len(rows) - 1)
            index = torch.tensor(rows, device=dev)
        else:
            index = torch.cumsum(torch.tensor(lengths, device=dev), 0) - 1
            last = None
        entries = [r.entry for r in batch]
        self.cache.prefill(entries, lengths)
        logits = self.model(tokens, positions=positions, cache=self.cache, logits_index=index)  # (rows, V)
        self.cache.advance()
        lastl = logits if last is None else logits[torch.tensor(last, device=dev)]
        self.entry_logits[torch.tensor(entries, device=dev)] = lastl.float()
        if last is not None:
            start = 0
            for r, n, a in zip(batch, lengths, want_all):
                if a:
                    self._prompt_logprobs(r, logits[start: start + n - 1])
                start += n if a else 1
        for r, n in zip(batch, lengths):
            self.entry_len[r.entry] = n
        self.counters["prompt_tokens"] += sum(lengths)
        self.sched.opened(batch)

    def _prompt_logprobs(self, r: _Request, logits: torch.Tensor):
        """Prompt token t's log-prob (t >= 1) from the logits at t-1, plus the top-k; the first has none."""
        k = r.params.prompt_logprobs
        lg = logits.float()
        if self.vocab_limit < lg.shape[1]:
            lg[:, self.vocab_limit:] = float("-inf")
        chosen = torch.tensor(r.prompt[1:], dtype=torch.int64, device=lg.device)
        c_lp, t_lp, t_ids = token_logprobs(lg, chosen, k)
        r.prompt_logprobs = [None] + logprob_dicts(r.prompt[1:], c_lp.tolist(), t_lp.tolist(), t_ids.tolist(),
                                                   [k] * len(r.prompt[1:]))

    @torch.inference_mode()
    def _start(self, slots: np.ndarray, take) -> list[int]:
        """First token of new samples from their prompt's logits; returns slots that already finished."""
        dev = self.device
        slots_t = torch.from_numpy(slots).to(dev)
        reqs = [r for r, _ in take]
        seeds = torch.tensor([seed_word(r.seed) for r in reqs], dtype=torch.int64, device=dev)
        keys = torch.tensor([r.noise_key for r in reqs], dtype=torch.int64, device=dev)
        samples = torch.tensor([j for _, j in take], dtype=torch.int64, device=dev)
        self.slot_key[slots_t] = sample_keys(seeds, keys, samples)
        self.slot_greedy[slots_t] = torch.tensor([j >= r.params.n for r, j in take], device=dev)
        self.cache.suffix_len[slots_t] = 0
        self.n_gen[slots] = 0
        self.slot_max[slots] = [r.params.max_new_tokens for r in reqs]
        self.slot_group[slots] = [r.group for r in reqs]
        self.slot_rule[slots] = [r.rule for r in reqs]
        self.slot_lp[slots] = [-1 if r.params.logprobs is None else r.params.logprobs for r in reqs]
        if self._step_fn is not None:
            self.slot_temp[slots_t] = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
            self.slot_top_p[slots_t] = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev)
            self.slot_top_k[slots_t] = torch.tensor([r.params.top_k for r in reqs], dtype=torch.int64, device=dev)
        for r, j in take:
            r.samples[j] = _Sample(logprobs=[] if r.params.logprobs is not None else None)
        logits = self.entry_logits[torch.from_numpy(self.sched.slot_entry[slots]).to(dev)]
        return self._accept(slots, slots_t, logits)

    # -- one decode step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode(self) -> list[int]:
        if self._step_fn is not None:
            return self._decode_static()
        B, dev = self.sched.B, self.device
        entries = self.sched.slot_entry[:B]
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
        logits = self.model(self.next_tok[:B], positions=positions, cache=self.cache)  # (B, V)
        self.cache.advance()
        self.counters["decode_steps"] += 1
        self.counters["slot_steps"] += B
        return self._accept(np.arange(B), torch.arange(B, device=dev), logits)

    def _decode_static(self) -> list[int]:
        """The decode step on the smallest bucket that holds the B live slots (rows B.. are padding)."""
        B, dev = self.sched.B, self.device
        Bb = next(b for b in self.buckets if b >= B)
        live = torch.arange(Bb, device=dev) < B
        slot_prefix = torch.from_numpy(self.sched.slot_entry[:Bb]).to(dev)
        steps = torch.from_numpy(self.n_gen[:Bb]).to(dev)
        groups = self.slot_group[:B]
        filtered = any(self._group_sig[g][1] < 1.0 or self._group_sig[g][2] > 0 for g in np.unique(groups))
        new, logits = self._step_fn(self.next_tok[:Bb], slot_prefix, live, self.slot_key[:Bb], steps,
                                    self.slot_temp[:Bb], self.slot_top_p[:Bb], self.slot_top_k[:Bb],
                                    self.slot_greedy[:Bb], self.vocab_limit, filtered)
        self.counters["decode_steps"] += 1
        self.counters["slot_steps"] += B
        new, logits = new[:B].clone(), logits[:B]
        return self._accept(np.arange(B), torch.arange(B, device=dev), logits, new)

    def _draw(self, slots: np.ndarray, slots_t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens for `slots`: one `sample_tokens` call per sampling-settings group present."""
        steps = torch.from_numpy(self.n_gen[slots]).to(self.device)
        keys = step_keys(self.slot_key[slots_t], steps)
        greedy = self.slot_greedy[slots_t]
        groups = self.slot_group[slots]
        if (groups == groups[0]).all():
            return sample_tokens(logits, keys, *self._group_sig[groups[0]], greedy)
        out = torch.empty(len(slots), dtype=torch.int64, device=self.device)
        for g in np.unique(groups):
            rows = torch.from_numpy(np.nonzero(groups == g)[0]).to(self.device)
            out[rows] = sample_tokens(logits[rows], keys[rows], *self._group_sig[g], greedy[rows])
        return out

    def _accept(self, slots: np.ndarray, slots_t: torch.Tensor, logits: torch.Tensor, new=None) -> list[int]:
        """Draw (unless given) and record the next token of `slots` from `logits` (len(slots), V); record stops;
        return the freed slots."""
        logits = logits.float()
        if new is None:
            if self.vocab_limit < logits.shape[1]:  # ids the tokenizer cannot decode are never drawn
                logits[:, self.vocab_limit:] = float("-inf")
            new = self._draw(slots, slots_t, logits)
        self.next_tok[slots_t] = new
        new_np = new.cpu().numpy()
        self.gen[slots, self.n_gen[slots]] = new_np
        self.n_gen[slots] += 1
        self.counters["generated_tokens"] += len(slots)
        sched = self.sched
        lpk = self.slot_lp[slots]
        if (lpk >= 0).any():
            self._record_logprobs(slots, new, logits, lpk)
        if self.stream:
            for slot, t in zip(slots.tolist(), new_np.tolist()):
                req = sched.slot_req[slot]
                j = int(sched.slot_sample[slot])
                req.samples[j].tokens.append(t)
                self._touched.setdefault(req, set()).add(j)
        # stops, vectorised per stop rule (usually one rule for the whole batch)
        rules = self.slot_rule[slots]
        eos = np.isin(new_np, self.eos_ids)
        stop_tok = np.zeros(len(slots), dtype=bool)
        check = np.zeros(len(slots), dtype=bool)
        for rid in ([rules[0]] if (rules == rules[0]).all() else np.unique(rules)):
            rule = self._rule_list[rid]
            m = rules == rid
            if not rule.eos:
                eos &= ~m
            if len(rule.stop_ids):
                stop_tok |= m & np.isin(new_np, rule.stop_ids)
            if rule.trigger is not None:
                check |= m & rule.trigger[new_np]
        length = self.n_gen[slots] >= self.slot_max[slots]
        check &= ~eos
        freed = []
        for i in np.nonzero(eos | stop_tok | length | check)[0]:
            slot = int(slots[i])
            req = sched.slot_req[slot]
            toks = self.gen[slot, : self.n_gen[slot]].tolist()
            ended = bool(eos[i] or stop_tok[i])
            text, reason, matched = self.finish_text(toks, req.params, drop_last=ended)
            if reason is None and not (ended or length[i]):
                continue  # a newline without a completed answer line
            if reason is not None:
                legacy, stop_reason = reason, ("answer" if reason == "answer" else matched)
            elif eos[i]:
                legacy, stop_reason = "eos", "eos"
            elif stop_tok[i]:
                legacy, stop_reason = "stop", int(new_np[i])
            else:
                legacy, stop_reason = "length", None
            j = int(sched.slot_sample[slot])
            s = req.samples[j]
            s.tokens = toks
            s.finished, s.text, s.legacy_reason, s.stop_reason = True, text, legacy, stop_reason
            s.finish_reason = "length" if legacy == "length" else "stop"
            req.n_finished += 1
            # a request that ends moves to the end: finished requests are reported in the order they end
            self._touched[req] = self._touched.pop(req, set()) | {j}
            sched.finish(slot)
            freed.append(slot)
        return freed

    def _record_logprobs(self, slots, new, logits, lpk):
        sel = np.nonzero(lpk >= 0)[0]
        rows = torch.from_numpy(sel).to(self.device)
        k = int(lpk[sel].max())
        c_lp, t_lp, t_ids = token_logprobs(logits[rows], new[rows], k)
        dicts = logprob_dicts(new[rows].tolist(), c_lp.tolist(), t_lp.tolist(), t_ids.tolist(), lpk[sel].tolist())
        for i, d in zip(sel.tolist(), dicts):
            slot = int(slots[i])
            self.sched.slot_req[slot].samples[int(self.sched.slot_sample[slot])].logprobs.append(d)

    # -- compaction and outputs -----------------------------------------------------------------------------

    @torch.inference_mode()
    def _compact(self, holes: list[int]):
        """Move the last live slots into the holes so that slots 0..B-1 stay the live ones."""
        src, dst = self.sched.compact(holes)
        if not len(src):
            return
        dev = self.device
        src_t, dst_t = torch.from_numpy(src).to(dev), torch.from_numpy(dst).to(dev)
        self.cache.move_slots(src_t, dst_t, int(self.n_gen[src].max()))
        for arr in (self.n_gen, self.slot_max, self.slot_group, self.slot_rule, self.slot_lp):
            arr[dst] = arr[src]
        self.gen[dst] = self.gen[src]
        tensors = [self.next_tok, self.slot_key, self.slot_greedy]
        if self._step_fn is not None:
            tensors += [self.slot_temp, self.slot_top_p, self.slot_top_k]
        for t in tensors:
            t[dst_t] = t[src_t]

    def _collect(self) -> list[RequestOutput]:
        outs = []
        touched, self._touched = self._touched, {}
        for req, idx in touched.items():
            samples = []
            for j in sorted(idx):
                s = req.samples[j]
                new = s.tokens[s.reported:]
                s.reported = len(s.tokens)
                toks, lps = s.tokens, s.logprobs
                if s.finished:
                    toks, lps = list(toks), None if lps is None else list(lps)
                samples.append(SampleOutput(j, new, toks, lps, s.finished, s.finish_reason, s.stop_reason, s.text))
            finished = req.n_finished == req.per_prompt
            outs.append(RequestOutput(req.id, req.prompt, None if req.sent_first else req.prompt_logprobs, samples,
                                      finished))
            req.sent_first = True
            if finished:
                self._requests.pop(req.id, None)
        return outs


def _pow2_buckets(n: int) -> list[int]:
    out, b = [], 8
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]
