"""Training options: the `TrainConfig` dataclass shared by the CLI, config files and the Python API, its
validation (`validate`, run by `train()` itself so API users get the CLI's checks), the situation-dependent
defaults (`resolve_config`) and which options may change on --resume."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..runs import is_model_path

# ----------------------------------------------------------------------------------------------------------
# Configuration


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every option of `fastmath train`; the CLI, config files and the Python API share it.

    Fields left at None are resolved by `resolve_config` (they depend on the model, the data and the device).
    """

    model: str = _opt("tiny", "model preset (tiny, test, llama2-7b, ...) trained from scratch, or a checkpoint directory to fine-tune")
    tokenizer: str | None = _opt(None, "tokenizer: a SentencePiece .model, a tokenizer.json or a checkpoint directory with either (default: the checkpoint's; for a preset, one is trained on the data)")
    tokenizer_vocab: int = _opt(768, "vocabulary size of a tokenizer trained on the fly")
    data: list = _opt((), "training JSONL file(s) in GSM8K, MATH, fastmath or {'text'} format (default: procedural problems)", multiple=True)
    weights: list = _opt((), "mixing weight per data file (2 = twice per epoch, 0.5 = half); default 1 each", multiple=True, type=float)
    template: str | None = _opt(None, "prompt template (default: vicuna, or plain for the procedural demo): vicuna (the paper's Vicuna-v1.1), plain, chat (the checkpoint's own chat_template: the rendered user turn and generation prompt are masked, the answer ends with the template's end of turn), or a format string with {question}")
    procedural: str = _opt("", "difficulty of the procedural default data, e.g. 'min_steps=2 max_steps=3 max_operand=20 ops=add,sub,mul'")
    procedural_examples: int = _opt(8000, "number of procedural training problems (when no --data)")
    val_examples: int = _opt(200, "held-out examples for the validation loss (procedural test split, or removed from --data)")
    eval_problems: int = _opt(100, "held-out problems for greedy accuracy (0 = none)")
    eval_every: int = _opt(0, "greedy accuracy and validation loss every N steps (0 = at the end only)")
    eval_max_new_tokens: int = _opt(0, "generation limit of the greedy evaluation (0 = 1.25x the longest held-out answer + 8)")
    max_len: int = _opt(2048, "longest document in tokens; longer ones are dropped or truncated")
    over_length: str = _opt("drop", "what to do with documents longer than --max-len: drop or truncate")
    micro_batch_tokens: int | None = _opt(None, "token budget of one packed micro-batch per rank (default: 4096 on CPU, 16384 on GPU; 2048 for the procedural demo)")
    batch_tokens: int | None = _opt(None, "global batch in tokens across ranks and accumulation (default: 8 micro-batches; 1 for the procedural demo)")
    epochs: float = _opt(3.0, "passes over the data (the paper: 3)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (0 = run the epochs; default 0, or 800 for the procedural demo); the schedule spans it")
    lr: float | None = _opt(None, "peak learning rate (default 2e-5 when fine-tuning a checkpoint, 1e-3 from scratch, 3e-3 for the procedural demo)")
    warmup: float = _opt(0.04, "linear warmup as a fraction of the steps (the paper: 4%)")
    min_lr_ratio: float = _opt(0.0, "cosine decays to lr * this")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    beta2: float | None = _opt(None, "AdamW beta2 (default 0.999 fine-tuning, 0.98 from scratch); beta1 is 0.9")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _opt(0, "seed of the initialisation, data order and held-out split")
    device: str = _opt("auto", "cpu, cuda or auto")
    dtype: str = _opt("auto", "compute dtype: auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    kernels: str = _opt("auto", "fused Triton kernels: auto (on for GPU tensors), on or off")
    compile: bool = _opt(False, "torch.compile each transformer block")
    activation_checkpointing: bool = _opt(False, "recompute each block in backward (less memory, ~1/3 more compute)")
    cpu_offload: bool = _opt(False, "FSDP2 CPU offload of parameters, gradients and optimizer state")
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")
    out: str = _opt("runs", "parent directory of run directories")
    save_every: int = _opt(0, "checkpoint every N steps (0 = only on time, signals and at the end)")
    save_minutes: float = _opt(30.0, "checkpoint every M minutes of training (0 = off)")
    keep: int = _opt(2, "checkpoints kept (the newest K)")
    log_every: int = _opt(1, "write a metrics line every N steps")
    cache_dir: str | None = _opt(None, "tokenization cache directory (default ~/.cache/fastmath/tokens; '' = off)")
    progress: bool = _opt(True, "show a progress bar")
    report_to: list = _opt((), "where metrics go besides metrics.jsonl: none, tensorboard, wandb", multiple=True)
    lora_rank: int = _opt(0, "LoRA rank: freeze the base weights and train rank-R adapters only (0 = full fine-tuning)")
    lora_alpha: float | None = _opt(None, "LoRA scaling numerator: the update is (alpha / rank) * B A (default: 2 * rank)")
    lora_dropout: float = _opt(0.0, "dropout on the input of each LoRA adapter")
    lora_targets: str = _opt("q,k,v,o", "comma-separated projections that get adapters: q,k,v,o,gate,up,down")
    merge: bool = _opt(False, "with --lora-rank: also export merged/, a full HF checkpoint with the adapters folded into the base weights")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


REPORT_TO = ("none", "tensorboard", "wandb")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def validate(cfg: TrainConfig) -> None:
    """ValueError, one sentence naming the option, for values that are wrong whatever the data.

    `train()` calls it, so the Python API gets the same checks as `fastmath train`."""
    if cfg.over_length not in ("drop", "truncate"):
        raise ValueError(f"--over-length must be drop or truncate, not {cfg.over_length!r}")
    if cfg.weights and len(cfg.weights) != len(cfg.data):
        raise ValueError(f"{len(cfg.weights)} --weights given for {len(cfg.data)} --data files")
    for name in ("dtype", "kernels", "device"):
        allowed = {"dtype": ("auto", "bf16", "fp32"), "kernels": ("auto", "on", "off"),
                   "device": ("auto", "cpu", "cuda")}[name]
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.epochs <= 0 and not cfg.max_steps:
        raise ValueError("give --epochs > 0 or --max-steps > 0")
    if not 0 <= cfg.warmup < 1:
        raise ValueError(f"--warmup is a fraction of the steps in [0, 1), not {cfg.warmup}")
    for r in cfg.report_to:
        if r not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {r!r}")
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, not {cfg.lora_rank}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout is a probability in [0, 1), not {cfg.lora_dropout}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be > 0, not {cfg.lora_alpha}")
    bad = [t for t in cfg.lora_targets.split(",") if t.strip() not in LORA_TARGETS]
    if bad or not cfg.lora_targets.strip():
        raise ValueError(f"--lora-targets takes a comma-separated subset of {','.join(LORA_TARGETS)}, "
                         f"not {cfg.lora_targets!r}")
    if cfg.merge and not cfg.lora_rank:
        raise ValueError("--merge merges LoRA adapters into the base weights; it needs --lora-rank")
    from ..data import CHAT, check_template
    from ..runs import is_model_path

    if cfg.template is not None:
        check_template(cfg.template)
    if cfg.template == CHAT and not cfg.tokenizer and not is_model_path(cfg.model):
        raise ValueError(f"--template chat renders the checkpoint's own chat template: --model must be a checkpoint "
                         f"directory with one (or --tokenizer a directory with one), not the preset {cfg.model!r}")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def load_config_file(path: str | os.PathLike) -> dict:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file; unknown keys are a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ValueError(f"{path}: reading TOML on Python 3.10 needs `pip install tomli`; "
                                     "or use a YAML config") from None
            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as e:  # the parsers' own messages name the line
        raise ValueError(f"{path}: cannot parse config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    if isinstance(raw.get("procedural"), dict):
        raw["procedural"] = " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in raw["procedural"].items())
    names = {f.name for f in config_fields()}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    for k in ("data", "weights", "report_to"):
        if k in raw and not isinstance(raw[k], (list, tuple)):
            raw[k] = [raw[k]]
    return raw



# ----------------------------------------------------------------------------------------------------------
# Training


# The embedded demo (no --data): the `tiny` preset (128-dim, ~1M parameters) from scratch on procedural problems
# (DEFAULT_CONFIG: a start value of 1-999, two add/subtract steps of 1-3 without carries, answers spread over
# ~1,000 values) with the plain prompt, sized to finish with `fastmath sample --n 256` well under 6 minutes on 2
# CPU cores (measured: 107 s of training at 15K tokens/s, 3 min 21 s in all with sampling). Small batches and a
# high peak lr: the budget buys ~1.6M tokens, so the number of updates matters more than gradient noise. 92%
# held-out greedy accuracy after 800 steps. The Vicuna system prompt was 69 of an example's 118 tokens: with it
# (and the earlier 256-dim tiny) 800 steps reached 76% and took 9 min with sampling.
DEMO = {"max_steps": 800, "micro_batch_tokens": 2048, "batch_tokens": 2048, "lr": 3e-3, "template": "plain"}


def resolve_config(cfg: TrainConfig, on_gpu: bool, world_size: int) -> TrainConfig:
    """Fill the options left at None from the situation (demo, checkpoint vs scratch, CPU vs GPU)."""
    finetune = is_model_path(cfg.model)
    demo = not cfg.data
    micro = cfg.micro_batch_tokens or (DEMO["micro_batch_tokens"] if demo else (16384 if on_gpu else 4096))
    if cfg.lr is not None:
        lr = cfg.lr
    else:
        lr = 2e-5 if finetune else (DEMO["lr"] if demo else 1e-3)
    return cfg.replace(
        lr=lr,
        template=cfg.template or (DEMO["template"] if demo else "vicuna"),
        beta2=cfg.beta2 if cfg.beta2 is not None else (0.999 if finetune else 0.98),
        micro_batch_tokens=micro,
        batch_tokens=cfg.batch_tokens or (micro * world_size if demo else micro * 8 * world_size),
        max_steps=cfg.max_steps if cfg.max_steps is not None else (DEMO["max_steps"] if demo else 0),
        data=list(cfg.data), weights=list(cfg.weights), report_to=list(cfg.report_to),
    )



# Options that change how a run uses the machine, not what it computes: a resumed run may take new values
# (the weights, losses and data order stay bitwise those of an uninterrupted run). Every other option is the
# run's saved config.
RESUME_OVERRIDABLE = ("threads", "save_every", "save_minutes", "keep", "eval_every", "progress", "cache_dir",
                      "report_to")


def check_resume_overrides(overrides: dict) -> None:
    """ValueError naming the options that would change a resumed run's results."""
    bad = [k for k in overrides if k not in RESUME_OVERRIDABLE]
    if bad:
        names = ", ".join("--" + k.replace("_", "-") for k in bad)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDABLE)
        raise ValueError(f"--resume continues a run exactly with its saved config, and {names} would change its "
                         f"results; drop {'it' if len(bad) == 1 else 'them'} (or start a new run); only {allowed} "
                         "may change on resume")

