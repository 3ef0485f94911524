"""fastmath: a custom-kernel trainer and sampler for math reasoning on LLaMA-family models (LLaMA-2/3.x,
Mistral, Qwen2.5).

`import fastmath` stays light: torch is imported only when a model-related name is used,
so `fastmath.grading` and `fastmath.synth` run without it.
"""
__version__ = "0.1.0"


def load_model(path_or_preset, device=None, dtype=None):
    """Load a Hugging Face LLaMA, Mistral or Qwen2 directory, or build a named preset with random weights.

    See `fastmath.checkpoint.load_model`.
    """
    from .checkpoint import load_model as _load_model

    return _load_model(path_or_preset, device=device, dtype=dtype)


def __getattr__(name):
    if name in ("ModelArgs", "PRESETS"):
        from . import config

        return getattr(config, name)
    if name == "Transformer":
        from .model import Transformer

        return Transformer
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'fastmath' has no attribute {name!r}")
