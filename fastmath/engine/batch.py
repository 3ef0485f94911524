"""`Sampler`: many samples for each of a list of prompts, all with one SamplingParams (the batch form of the
engine that `fastmath sample` and the benchmarks use).

It sizes the memory plan for exactly these prompts (the longest prompt and max_new_tokens, not the model's
context), gives each prompt its problem index as the noise key, and yields each problem when all its samples
have ended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .engine import Engine, window_refusal
from .kv_cache import MemoryPlan, default_kv_budget, plan_memory
from .sampling import SamplingParams


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


def _legacy_reason(s) -> str:
    if s.finish_reason == "length":
        return "length"
    return s.stop_reason if s.stop_reason in ("eos", "answer") else "stop"


class Sampler:
    """Sample many completions per prompt with a shared-prefix KV cache and continuous batching.

    Args:
        model: a fastmath Transformer (or anything with `.args` and the packed cache call).
        tokenizer: fastmath Tokenizer (EOS id, decoding and stop checks).
        kv_cache_gb: KV budget in GiB (default: free CUDA memory, or 1.5 GiB on CPU).
        max_slots: upper bound on concurrent sequences (default 256 on CPU, 2048 on CUDA).
        prefill_tokens: most prompt tokens prefilled in one forward.
        compile, buckets, static_step: the static decode step, compiled or not (see Engine).
    """

    def __init__(self, model, tokenizer, kv_cache_gb: float | None = None, max_slots: int | None = None,
                 prefill_tokens: int = 8192, compile: bool = False, buckets=None, static_step: bool | None = None):
        self.model = model.eval()
        self.args = model.args
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer = tokenizer
        self.kv_cache_gb = kv_cache_gb
        self.max_slots = max_slots or (2048 if self.device.type == "cuda" else 256)
        self.prefill_tokens = prefill_tokens
        self.compile, self.buckets, self.static_step = compile, buckets, static_step
        self.stats = {"generated_tokens": 0, "decode_steps": 0, "slot_steps": 0, "prefill_tokens": 0}
        self.plan: MemoryPlan | None = None
        self.engine: Engine | None = None

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
            indices: the global problem index of each prompt (the noise key; default 0..N-1), so a shard
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
        need = max(len(p) for p in prompts) + params.max_new_tokens
        window = getattr(self.args, "sliding_window", None)
        if window is not None and need > window:
            longest = max(range(len(prompts)), key=lambda j: len(prompts[j]))
            raise ValueError(f"problem {indices[longest]}: " + window_refusal(
                f"a prompt of {len(prompts[longest])} tokens plus max_new_tokens={params.max_new_tokens}", window))
        plan = self.prepare(prompts, params, indices)
        context = max(self.args.max_seq_len, need)
        if window is not None:
            context = min(context, window)
        engine = Engine(self.model, self.tokenizer, max_model_len=context, compile=self.compile, plan=plan,
                        stream=False, buckets=self.buckets, prefill_tokens=self.prefill_tokens,
                        static_step=self.static_step)
        self.engine = engine
        for pos, (i, p) in enumerate(zip(indices, prompts)):
            engine.add_request(str(pos), p, params, noise_key=int(i))
        base = dict(self.stats)
        results: dict[str, dict[int, Completion]] = {}
        while engine.has_unfinished():
            outs = engine.step()
            c = engine.counters
            self.stats.update(generated_tokens=base["generated_tokens"] + c["generated_tokens"],
                              decode_steps=base["decode_steps"] + c["decode_steps"],
                              slot_steps=base["slot_steps"] + c["slot_steps"],
                              prefill_tokens=base["prefill_tokens"] + c["prompt_tokens"])
            for out in outs:
                got = results.setdefault(out.request_id, {})
                for s in out.outputs:
                    if s.finished:
                        got[s.index] = Completion(s.token_ids, s.text, _legacy_reason(s))
                if out.finished:
                    pos = int(out.request_id)
                    del results[out.request_id]
                    yield ProblemSamples(indices[pos], len(prompts[pos]), [got[j] for j in range(params.n)],
                                         got.get(params.n))
