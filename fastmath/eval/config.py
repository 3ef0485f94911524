"""Every option of `fastmath sample` in one dataclass: the CLI (fastmath/commands/sample.py builds its options
from these fields), the Python API (`evaluate(SampleConfig(...))` or `evaluate(**options)`) and run_args.json
cannot drift apart."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str, **kw):
    """A field with its CLI help; kw: min / max / min_open (ranges), choices, flag (an --x switch),
    negatable (--x/--no-x), decls (option names), cli (False: Python API only)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SampleConfig:
    """`fastmath sample`'s options (see its --help)."""

    model: str = _opt("runs/latest", "Run directory (its final/, else its newest checkpoints/step_N/), a checkpoint directory, or a LoRA adapter directory (PEFT format).")
    base: str | None = _opt(None, "Base checkpoint of a LoRA adapter given as --model (default: the adapter's base_model_name_or_path).")
    data: str | None = _opt(None, "JSONL problems (GSM8K, MATH or fastmath records). Default: the built-in held-out procedural set (the run's difficulty and seed; 100 problems unless --problems).")
    n: int = _opt(256, "Samples per problem (under torchrun write -n: torchrun's own parser takes --n as --nnodes).", min=1, decls=("-n", "--n"))
    temperature: float = _opt(0.7, "Sampling temperature (0 = greedy samples).", min=0)
    top_p: float = _opt(1.0, "Nucleus sampling mass (1 = off).", min=0, max=1, min_open=True)
    top_k: int = _opt(0, "Top-k filter (0 = off).", min=0)
    max_new_tokens: int = _opt(512, "Most tokens generated per sample.", min=1)
    seed: int = _opt(0, "Noise seed: each token's noise depends only on (seed, problem, sample, step).")
    out: str | None = _opt(None, "Output folder. Default: eval/ in the run directory.")
    greedy: bool = _opt(False, "Also decode one greedy answer per problem (first-answer accuracy).", flag=True)
    problems: int | None = _opt(None, "Only the first K problems.", min=1)
    template: str | None = _opt(None, "Prompt template: vicuna, plain, chat (the checkpoint's own chat_template), or a format string with {question}. Default: the run's training template, else vicuna.")
    fewshot: int = _opt(0, "Prepend K solved procedural problems (for base models that were not fine-tuned).", min=0)
    stop_at_answer: bool = _opt(True, "Stop a sample after its completed 'The answer is: ...' line.", negatable=True)
    kv_cache_gb: float | None = _opt(None, "KV cache budget in GiB. Default: free GPU memory, or 1.5 GiB on CPU.", min=0, min_open=True)
    max_slots: int | None = _opt(None, "Most sequences decoded at once. Default: 256 on CPU, 2048 on GPU (memory permitting).", min=1)
    device: str = _opt("auto", "cpu, cuda or auto.")
    dtype: str = _opt("auto", "Weights and KV cache dtype (auto: bf16 on GPU, fp32 on CPU).", choices=("auto", "bf16", "fp16", "fp32"))
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default; 1 is often faster when other jobs share the cores).", min=0)
    compile: bool = _opt(False, "Decode with a torch.compile'd static step (CUDA graphs on CUDA; slot-count buckets). Same samples up to floating-point effects; compiling takes a while.", flag=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v, m = getattr(self, f.name), f.metadata
            if v is None:
                continue
            if "choices" in m and v not in m["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(m['choices'])}, not {v!r}")
            lo, hi = m.get("min"), m.get("max")
            if lo is not None and (v < lo or (m.get("min_open") and v == lo)):
                raise ValueError(f"{f.name} must be {'>' if m.get('min_open') else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"{f.name} must be <= {hi}, got {v}")


def sample_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(SampleConfig))
