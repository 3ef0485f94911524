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

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.intermediate_size = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (derived fields are derived again unless given)."""
        fields = dataclasses.asdict(self)
        if "intermediate_size" not in changes and any(k in changes for k in ("dim", "multiple_of", "ffn_dim_multiplier")):
            fields["intermediate_size"] = None
        fields.update(changes)
        return ModelArgs(**fields)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (untied embedding and output head)."""
        h, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h
        n = self.n_layers * per_layer + h + self.vocab_size * h  # + final norm + lm_head
        return n + (self.vocab_size * h if embeddings else 0)


PRESETS: dict[str, ModelArgs] = {
    # Published LLaMA-2 dimensions (Touvron et al. 2023; Meta's params.json).
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),  # intermediate 11008
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),  # intermediate 13824
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),  # 28672
    # ~3.7M parameters: trains on 2 CPU cores in minutes (the demo). Its vocab is replaced by the tokenizer's.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, vocab_size=1024, multiple_of=64, max_seq_len=1024),
    # Smallest model that still exercises GQA, several layers and SwiGLU: for unit tests.
    "test": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=512),
}


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of a named preset; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
