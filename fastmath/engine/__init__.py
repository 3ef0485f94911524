"""The engine: a request stream continuously batched over a shared-prefix KV cache (see engine.py).

kv_cache.py   SharedPrefixKVCache, attention helpers, MemoryPlan / plan_memory / default_kv_budget
sampling.py   counter-based noise, sample_tokens (temperature, top-p, top-k), log-probs, SamplingParams
scheduler.py  host-only admission queue, slot assignment and compaction
engine.py     Engine (add_request / step / abort), the compilable decode step
"""
from .engine import Engine, EngineError, RequestOutput, SampleOutput, decode_step
from .sampling import SamplingParams

__all__ = ["Engine", "EngineError", "RequestOutput", "SampleOutput", "SamplingParams", "decode_step"]
