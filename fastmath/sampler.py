"""Compatibility module: the sampler now lives in fastmath.engine (the engine) and fastmath.eval (`fastmath
sample`). Every name that was importable from here still is."""
from __future__ import annotations

from .engine.batch import Completion, ProblemSamples, Sampler
from .engine.engine import Engine, EngineError, RequestOutput, SampleOutput
from .engine.kv_cache import (DEFAULT_CPU_KV_GB, SAMPLING_BYTES_PER_LOGIT, MemoryPlan, SharedPrefixKVCache, _size,
                              attention_with_lse, default_kv_budget, length_bias, merge_attention, plan_memory,
                              shared_prefix_decode_attention)
from .engine.sampling import (SamplingParams, _mix32, _nucleus_mask, gumbel_noise, sample_keys, sample_tokens,
                              step_keys)


def evaluate(*args, **kwargs):
    """`fastmath sample`'s Python API; see fastmath.eval.evaluate."""
    from .eval import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["Completion", "DEFAULT_CPU_KV_GB", "Engine", "EngineError", "MemoryPlan", "ProblemSamples",
           "RequestOutput", "SAMPLING_BYTES_PER_LOGIT", "SampleOutput", "Sampler", "SamplingParams",
           "SharedPrefixKVCache", "attention_with_lse", "default_kv_budget", "evaluate", "gumbel_noise",
           "length_bias", "merge_attention", "plan_memory", "sample_keys", "sample_tokens",
           "shared_prefix_decode_attention", "step_keys", "_mix32", "_nucleus_mask", "_size"]
