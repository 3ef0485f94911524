"""Model configuration: one dataclass and the named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (multi-head attention); fewer means GQA
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this (Meta's reference code)
    ffn_dim_multiplier: float | None = None  # 1.3 for the 70B model
    intermediate_size: int | None = None  # derived from dim when None (as in Meta's FeedForward)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # LLaMA-2 context length; only used for config.json and KV-cache limits
    # Switches for the LLaMA-block families beyond LLaMA-2 (all off: the LLaMA-2 block).
    head_dim: int | None = None  # per-head width; None means dim // n_heads (configs may give it explicitly)
    qkv_bias: bool = False  # bias on the q/k/v projections, none on o_proj (Qwen2)
    tie_embeddings: bool = False  # lm_head is embed_tokens' weight: one parameter (LLaMA-3.2 1B/3B, Qwen2.5 <= 3B)
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #                                    "original_max_position_embeddings"} (LLaMA-3.1 and later); None: plain theta
    sliding_window: int | None = None  # Mistral v0.1's window: accepted only while no sequence is longer than it
    model_type: str = "llama"  # the Hugging Face family written back to config.json: llama, mistral or qwen2

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary rotates pairs)")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.intermediate_size = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (derived fields are derived again unless given)."""
        fields = dataclasses.asdict(self)
        if "intermediate_size" not in changes and any(k in changes for k in ("dim", "multiple_of", "ffn_dim_multiplier")):
            fields["intermediate_size"] = None
        if "head_dim" not in changes and any(k in changes for k in ("dim", "n_heads")):
            fields["head_dim"] = None
        fields.update(changes)
        return ModelArgs(**fields)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; a tied output head is the embedding (counted once, with `embeddings`)."""
        h, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        n = self.n_layers * per_layer + h  # + final norm
        if not self.tie_embeddings:
            n += self.vocab_size * h  # lm_head
        return n + (self.vocab_size * h if embeddings or self.tie_embeddings else 0)


MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict) -> dict | None:
    """Normalise a rope-scaling dict (old `type` or new `rope_type` spelling) to {"rope_type": "llama3", ...},
    None for "default"; any other type, or a llama3 dict without its four fields, is refused by name."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (fastmath implements: {', '.join(ROPE_TYPES)})")
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling 'llama3' needs {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_KEYS}}


def _llama3(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, ModelArgs] = {
    # Published LLaMA-2 dimensions (Touvron et al. 2023; Meta's params.json).
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),  # intermediate 11008
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),  # intermediate 13824
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),  # 28672
    # Published configs (config.json on the Hugging Face hub); counts in tests/test_config.py.
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, intermediate_size=14336,
                             rope_theta=500000.0, rope_scaling=_llama3(8.0), max_seq_len=131072),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, intermediate_size=8192,
                             rope_theta=500000.0, rope_scaling=_llama3(32.0), tie_embeddings=True, max_seq_len=131072),
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32768, intermediate_size=14336,
                            rope_theta=1e6, max_seq_len=32768, model_type="mistral"),  # v0.3: no sliding window
    "qwen2.5-7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, intermediate_size=18944,
                            norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, max_seq_len=131072, model_type="qwen2"),
    "qwen2.5-1.5b": ModelArgs(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, vocab_size=151936, intermediate_size=8960,
                              norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True, max_seq_len=131072,
                              model_type="qwen2"),
    # ~1M parameters: the demo's model, trained on 2 CPU cores in minutes. Its vocab is replaced by the tokenizer's.
    # (It was 256-dim, 3.6M parameters, until issue 17. On the demo's problems and plain prompt, 800 steps gave
    # 94% held-out greedy accuracy at 128-dim and 88% at 192-dim; the 256-dim model, at three times the cost per
    # token, reached 75% with the Vicuna prompt and 60% with the plain one in 560 steps.)
    "tiny": ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=64, max_seq_len=1024),
    # Smallest model that still exercises GQA, several layers and SwiGLU: for unit tests.
    "test": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=512),
}


# Presets whose vocabulary is the tokenizer's when trained from scratch; the others keep their published one.
TOKENIZER_VOCAB_PRESETS = ("tiny", "test")


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of a named preset; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace()
