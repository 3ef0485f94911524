"""Packed-sequence supervised fine-tuning (and pre-training) of LLaMA-2 models: one CPU/GPU or torchrun + FSDP2.

One optimizer step = `accum` packed micro-batches per rank (`world_size * accum` packs in all, a token
budget each). The loss of a step is the sum of per-token cross-entropies over every target token of the
whole global batch divided by that count (known before the forward, from the labels), so micro-batch and
rank splits do not change the gradient.

A run lives in `runs/<timestamp>/`: config.json (resolved, with versions and git commit), metrics.jsonl,
checkpoints/step_N/ (HF layout + trainer_state/ for exact resume), final/ (HF layout), loss.png;
`runs/latest` points at the newest run. See `TrainConfig` for every option.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from . import fsio
from .grading import extract_answer, is_equiv
from .synth import procedural as P

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
    tokenizer: str | None = _opt(None, "SentencePiece .model file (default: the checkpoint's; for a preset, one is trained on the data)")
    tokenizer_vocab: int = _opt(768, "vocabulary size of a tokenizer trained on the fly")
    data: list = _opt((), "training JSONL file(s) in GSM8K, MATH, fastmath or {'text'} format (default: procedural problems)", multiple=True)
    weights: list = _opt((), "mixing weight per data file (2 = twice per epoch, 0.5 = half); default 1 each", multiple=True, type=float)
    template: str = _opt("vicuna", "prompt template: vicuna (the paper's Vicuna-v1.1), plain, or a format string with {question}")
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

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


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
    for k in ("data", "weights"):
        if k in raw and not isinstance(raw[k], (list, tuple)):
            raw[k] = [raw[k]]
    return raw


def parse_procedural(spec: str) -> P.ProceduralConfig:
    """'min_steps=2 max_steps=3 ops=add,sub' -> ProceduralConfig (defaults for the rest)."""
    d = {}
    for item in spec.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"procedural option {item!r} is not key=value")
        try:
            d[key] = value if key in ("ops", "style") else (float(value) if key == "test_fraction" else int(value))
        except ValueError:
            raise ValueError(f"procedural option {item!r} needs a number") from None
    base = dataclasses.asdict(P.DEFAULT_CONFIG)
    base.update(d)
    return P.config_from_dict(base)


def is_checkpoint_dir(model: str) -> bool:
    return Path(model).is_dir()


# ----------------------------------------------------------------------------------------------------------
# Run directory helpers


def versions() -> dict:
    import torch

    import fastmath

    out = {"fastmath": fastmath.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
           "numpy": np.__version__}
    for name in ("triton", "transformers", "sentencepiece"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def new_run_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory in {parent}")


def point_latest(run_dir: Path) -> None:
    """runs/latest -> run_dir (relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def write_json_atomic(path: Path, obj) -> None:
    """path holds the old JSON or the new one, never a part (fsio.StorageError when it cannot be written)."""
    fsio.atomic_write_json(path, obj)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    for p in (run_dir / "checkpoints").glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit() and (p / "trainer_state" / "state.json").is_file():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def find_run_dir(resume: str) -> Path:
    """A run directory from --resume: a run dir, 'latest' / a runs dir holding 'latest', or a step_N dir."""
    p = Path(resume)
    if resume == "latest":
        p = Path("runs") / "latest"
    if (p / "latest").exists() and not (p / "config.json").exists():
        p = p / "latest"
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        p = p.parent.parent
    p = p.resolve()
    if not (p / "config.json").is_file():
        raise ValueError(f"{resume}: not a fastmath run directory (no config.json)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Schedule, evaluation


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warm = max(1, math.ceil(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def answers_match(pred: str | None, gold: str | None) -> bool:
    """fastmath.grading's verdict: the prediction against the reference answer."""
    return pred is not None and gold is not None and is_equiv(pred, gold)


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, dist_=None) -> list[list[int]]:
    """Batched greedy decoding with a KV cache. Under FSDP every rank must call this with the same number of
    prompts; the stopping test is agreed across ranks so all run the same number of forwards."""
    import torch

    from .attention import KVCache
    from .distributed import all_reduce

    dev = next(model.parameters()).device
    args = model.args
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cache = KVCache(args.n_layers, len(prompts), int(lengths.max()) + max_new_tokens, args.n_kv_heads, args.head_dim,
                    dtype, dev)
    tokens = torch.tensor([t for p in prompts for t in p], device=dev)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths.tolist()])
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    with torch.no_grad(), _autocast(dev):
        cache.prefill(lengths)
        logits = model(tokens, positions=positions, cache=cache, logits_index=torch.cumsum(lengths, 0) - 1)
        cache.advance()
        for step in range(max_new_tokens):
            nxt = logits.float().argmax(-1)  # (B,)
            for b in (~done).nonzero().flatten().tolist():
                out[b].append(int(nxt[b]))
            done |= nxt == eos_id
            remaining = (~done).sum().reshape(1)
            if dist_ is not None:
                all_reduce(remaining, dist_)
            if int(remaining) == 0 or step == max_new_tokens - 1:
                break
            cache.decode()
            logits = model(nxt, positions=cache.lengths.long(), cache=cache)
            cache.advance()
    return out


def _autocast(dev):
    import contextlib

    import torch

    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def greedy_accuracy(model, tokenizer, problems: list[dict], template: str, max_new_tokens: int, dist_,
                    batch_size: int = 64) -> tuple[float, list[dict]]:
    """Share of `problems` ({'question', 'answer'}) whose greedy answer matches; problems split over ranks."""
    import torch

    from .distributed import all_reduce

    was_training = model.training
    model.eval()
    mine = problems[dist_.rank::dist_.world_size]
    per_rank = -(-len(problems) // dist_.world_size)
    rows = []
    for s in range(0, per_rank, batch_size):
        chunk = mine[s:s + batch_size]
        prompts = [D.encode_prompt(tokenizer, p["question"], template) for p in chunk]
        n_real = len(prompts)
        want = min(batch_size, per_rank - s)
        prompts += [prompts[0] if prompts else [tokenizer.bos_id]] * (want - n_real)  # same forwards on every rank
        gens = greedy_generate(model, prompts, max_new_tokens, tokenizer.eos_id, dist_ if dist_.enabled else None)
        for p, g in zip(chunk, gens[:n_real]):
            text = tokenizer.decode(g)
            pred = extract_answer(text)  # fastmath.grading: the same extraction as `fastmath sample`
            rows.append({"question": p["question"], "gold": p["answer"], "pred": pred, "output": text,
                         "correct": answers_match(pred, str(p["answer"]))})
    counts = torch.tensor([sum(r["correct"] for r in rows), len(rows)], dtype=torch.float64)
    all_reduce(counts, dist_)
    model.train(was_training)
    return float(counts[0] / max(1.0, float(counts[1]))), rows


def validation_loss(model, stream: D.PackedStream, dist_, dev) -> float:
    """Mean cross-entropy per target token over every held-out pack (ranks share the packs)."""
    import torch

    from .distributed import all_reduce

    packs = stream.epoch_packs(0)
    n_rounds = -(-len(packs) // dist_.world_size)
    total = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(dev):
        for r in range(n_rounds):
            i = r * dist_.world_size + dist_.rank
            real = i < len(packs)
            b = D.make_batch(stream.docs, stream.labels, packs[i if real else 0])
            loss_sum, n = model(**b.to_torch(dev))
            if real:
                total += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
    all_reduce(total, dist_)
    model.train(was_training)
    return float(total[0] / max(1.0, float(total[1])))


# ----------------------------------------------------------------------------------------------------------
# Data preparation


@dataclass
class Prepared:
    tokenizer: object
    tokenizer_path: Path
    train: D.TokenizedDocs
    val: D.TokenizedDocs
    eval_problems: list[dict]
    counts: dict


def prepare_data(cfg: TrainConfig, run_dir: Path | None, dist_, log=print) -> Prepared:
    """Read (or generate) the data, get a tokenizer, tokenize (cached) and split off the held-out part."""
    from .tokenizer import Tokenizer, train_tokenizer

    counts: dict = {}
    if cfg.data:
        examples_by_file = [D.read_examples(p) for p in cfg.data]
        heldout_examples = None
    else:
        pcfg = parse_procedural(cfg.procedural)
        recs = P.generate(cfg.procedural_examples, pcfg, split="train", seed=cfg.seed)
        examples_by_file = [[D.record_to_example(r) for r in recs]]
        held = P.heldout_set(max(cfg.val_examples, cfg.eval_problems), pcfg, seed=cfg.seed)
        heldout_examples = [D.record_to_example(r) for r in held]
        counts["procedural"] = dataclasses.asdict(pcfg)

    # Tokenizer: given, from the checkpoint, or trained on this data (rank 0 writes, the others wait).
    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
    elif is_checkpoint_dir(cfg.model):
        tok_path = Path(cfg.model) / "tokenizer.model"
        if not tok_path.is_file():
            raise ValueError(f"{cfg.model}: checkpoint has no tokenizer.model; pass --tokenizer")
    else:
        if run_dir is None:
            raise ValueError("a tokenizer trained on the fly needs a run directory")
        tok_path = run_dir / "tokenizer.model"
        if dist_.is_main and not tok_path.is_file():
            sample = [e for ex in examples_by_file for e in ex[:20000]]
            log(f"training a {cfg.tokenizer_vocab}-token SentencePiece BPE tokenizer on {len(sample)} examples")
            texts = list(D.texts_for_tokenizer(sample, cfg.template))
            try:
                train_tokenizer(texts, tok_path, cfg.tokenizer_vocab)
            except RuntimeError as e:  # small corpora cannot fill a large vocabulary; SentencePiece says how many
                m = re.search(r"<= (\d+)", str(e))
                if not m:
                    raise
                log(f"this data supports at most {m.group(1)} tokens; training that many")
                train_tokenizer(texts, tok_path, int(m.group(1)))
        from .distributed import barrier

        barrier(dist_)
    tokenizer = Tokenizer(tok_path)

    if cfg.data:
        parts, hits = [], 0
        for p in cfg.data:
            docs, hit = D.load_tokenized(p, tokenizer, cfg.template, cache_dir=cfg.cache_dir,
                                         progress=cfg.progress and dist_.is_main)
            parts.append(docs)
            hits += hit
        counts["cache_hits"] = hits
        # Held-out slice: val_examples documents drawn (seeded) from all files before mixing.
        sizes = [len(p) for p in parts]
        n_val = min(cfg.val_examples, sum(sizes) // 10)
        rng = np.random.default_rng([cfg.seed, 0x76616C])
        val_global = set(rng.permutation(sum(sizes))[:n_val].tolist())
        train_parts, val_parts, base = [], [], 0
        for p, n in zip(parts, sizes):
            ids = np.arange(base, base + n)
            keep = np.array([i - base for i in ids if i not in val_global], dtype=np.int64)
            held = np.array([i - base for i in ids if i in val_global], dtype=np.int64)
            train_parts.append(p.select(keep))
            if len(held):
                val_parts.append(p.select(held))
            base += n
        weights = list(cfg.weights) or [1.0] * len(parts)
        train = D.mix(train_parts, weights, seed=cfg.seed)
        val = D.TokenizedDocs.concat(val_parts) if val_parts else train.select([])
        eval_problems = []
        # Greedy problems come from the held-out documents that have a prompt and a gold answer.
        flat_examples = [e for ex in examples_by_file for e in ex]
        for gi in sorted(val_global):
            e = flat_examples[gi]
            if e.prompt is not None and e.answer is not None and len(eval_problems) < cfg.eval_problems:
                eval_problems.append({"question": e.prompt, "answer": e.answer})
    else:
        train = D.tokenize_examples(examples_by_file[0], tokenizer, cfg.template)
        val = D.tokenize_examples(heldout_examples[:cfg.val_examples], tokenizer, cfg.template)
        eval_problems = [{"question": e.prompt, "answer": e.answer} for e in heldout_examples[:cfg.eval_problems]]

    # A document must fit one micro-batch: the effective length limit is min(max_len, micro_batch_tokens).
    max_len = min(cfg.max_len, cfg.micro_batch_tokens or cfg.max_len)
    train, c = D.limit_length(train, max_len, cfg.over_length)
    counts.update({f"train_{k}": v for k, v in c.items()})
    val, _ = D.limit_length(val, max_len, "drop")
    if len(train) == 0:
        raise ValueError(f"no training documents left (all longer than {max_len} tokens)")
    counts.update(train_docs=len(train), train_tokens=int(train.lengths.sum()),
                  train_targets=int((D.flat_labels(train) != D.IGNORE).sum()), val_docs=len(val))
    return Prepared(tokenizer, tok_path, train, val, eval_problems, counts)


# ----------------------------------------------------------------------------------------------------------
# Training


# The embedded demo (no --data): the `tiny` preset from scratch on procedural problems, sized to finish in
# under 5 minutes on 2 idle CPU cores (~6.5K tokens/s: 800 steps x 2048 tokens in ~260 s). Small batches and
# a high peak lr: the budget buys ~1.6M tokens, so the number of updates matters more than gradient noise.
# Measured on a quiet machine: held-out greedy accuracy 9% after 250 steps, 18% at 400, 22% at 600, 35% at 800.
DEMO = {"max_steps": 800, "micro_batch_tokens": 2048, "batch_tokens": 2048, "lr": 3e-3}


def resolve_config(cfg: TrainConfig, on_gpu: bool, world_size: int) -> TrainConfig:
    """Fill the options left at None from the situation (demo, checkpoint vs scratch, CPU vs GPU)."""
    finetune = is_checkpoint_dir(cfg.model)
    demo = not cfg.data
    micro = cfg.micro_batch_tokens or (DEMO["micro_batch_tokens"] if demo else (16384 if on_gpu else 4096))
    if cfg.lr is not None:
        lr = cfg.lr
    else:
        lr = 2e-5 if finetune else (DEMO["lr"] if demo else 1e-3)
    return cfg.replace(
        lr=lr,
        beta2=cfg.beta2 if cfg.beta2 is not None else (0.999 if finetune else 0.98),
        micro_batch_tokens=micro,
        batch_tokens=cfg.batch_tokens or (micro * world_size if demo else micro * 8 * world_size),
        max_steps=cfg.max_steps if cfg.max_steps is not None else (DEMO["max_steps"] if demo else 0),
        data=list(cfg.data), weights=list(cfg.weights),
    )


def flops_per_token(args, mean_sq_len: float) -> float:
    """Training FLOPs per token: 6 * non-embedding params + attention (12 * layers * heads * head_dim * L),
    with L = sum(len^2) / sum(len) of the packed documents (causal attention within documents)."""
    n = args.num_params(embeddings=False)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * mean_sq_len


def peak_flops(dev) -> float | None:
    """Dense bf16 peak of the GPU (H100/H200: 989 TFLOP/s); None when unknown."""
    import torch

    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return 989e12 if ("H100" in name or "H200" in name) else (312e12 if "A100" in name else None)


def estimate_memory(args, cfg: TrainConfig, world_size: int) -> dict:
    """Rough bytes per GPU: fp32 master weights, grads and Adam moments (sharded over ranks), bf16 gathered
    weights of one block, and activations of one micro-batch (~34 * dim bytes per token per layer in
    bf16, Korthikanti et al.; ~2 * dim with activation checkpointing, plus one block's worth)."""
    p = args.num_params()
    states = 16 * p / world_size
    per_layer = (p - 2 * args.vocab_size * args.dim) / max(1, args.n_layers)
    gathered = 2 * per_layer * (2 if world_size > 1 else 0)
    t = cfg.micro_batch_tokens
    act_layer = 34 * args.dim * t
    acts = (2 * args.dim * t * args.n_layers + act_layer) if cfg.activation_checkpointing else act_layer * args.n_layers
    head = t * 4 * min(args.vocab_size, 4096)  # fused CE works in chunks
    return {"params": p, "states_gb": states / 2**30, "activations_gb": (acts + head) / 2**30,
            "total_gb": (states + gathered + acts + head) / 2**30}


def accumulate_gradients(model, batches: list[D.PackedBatch], n_total: int, dist_, dev, use_bf16: bool) -> float:
    """Forward/backward this rank's micro-batches of one step; returns this rank's summed loss.

    Each micro-batch's summed loss is divided by `n_total`, the target count of the whole global batch
    (all ranks, all micro-batches), and multiplied by the world size because FSDP averages gradients over
    ranks: the accumulated gradient is exactly that of (sum of all target losses) / n_total.
    """
    scale = dist_.world_size / max(1, n_total)
    total = 0.0
    for i, b in enumerate(batches):
        if dist_.fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        with _autocast(dev) if use_bf16 else _null():
            loss_sum, _ = model(**b.to_torch(dev))
        (loss_sum * scale).backward()
        total += float(loss_sum.detach())
    return total


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.caught = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.caught = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainingDiverged(RuntimeError):
    pass


# Options that change how a run uses the machine, not what it computes: a resumed run may take new values
# (the weights, losses and data order stay bitwise those of an uninterrupted run). Every other option is the
# run's saved config.
RESUME_OVERRIDABLE = ("threads", "save_every", "save_minutes", "keep", "eval_every", "progress", "cache_dir")


def check_resume_overrides(overrides: dict) -> None:
    """ValueError naming the options that would change a resumed run's results."""
    bad = [k for k in overrides if k not in RESUME_OVERRIDABLE]
    if bad:
        names = ", ".join("--" + k.replace("_", "-") for k in bad)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDABLE)
        raise ValueError(f"--resume continues a run exactly with its saved config, and {names} would change its "
                         f"results; drop {'it' if len(bad) == 1 else 'them'} (or start a new run); only {allowed} "
                         "may change on resume")


def train(cfg: TrainConfig, resume: str | None = None, dry_run: bool = False, log=None,
          resume_overrides: dict | None = None) -> dict:
    """Run (or resume) a training run and return its summary (also written to run_dir/summary.json).

    Args:
        cfg: the options (ignored when resuming: the run's own resolved config is used).
        resume: a run directory, 'latest', or a checkpoint directory of a run, to continue exactly.
        dry_run: print parameter count, estimated memory per GPU and steps, then return.
        resume_overrides: with `resume`, new values of RESUME_OVERRIDABLE options (threads, save_every, ...).
    Raises:
        fsio.StorageError: a checkpoint, export or log could not be written (full disk, I/O error); its one
            sentence names the step, the path and the last good checkpoint to --resume from.
    """
    closers = []  # what a failed write must close before the error leaves (progress bar, metrics, process group)
    try:
        return _train(cfg, resume, dry_run, log, resume_overrides or {}, closers)
    except fsio.StorageError:
        for close in reversed(closers):
            try:
                close()
            except Exception:
                pass
        raise


def _train(cfg: TrainConfig, resume, dry_run: bool, log, resume_overrides: dict, closers: list) -> dict:
    import torch

    from . import distributed as dist_mod
    from .checkpoint import load_model, read_model_args, save_checkpoint
    from .config import get_preset
    from .model import Transformer

    run_dir = None
    if resume:
        run_dir = find_run_dir(resume)
        saved = json.loads((run_dir / "config.json").read_text())
        check_resume_overrides(resume_overrides)
        cfg = TrainConfig(**saved["config"]).replace(**resume_overrides)
    if cfg.cpu_offload and (cfg.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("--cpu-offload moves FSDP shards between a GPU and host memory; it needs a GPU")
    dist_ = dist_mod.init(cfg.device, fsdp_alone=cfg.cpu_offload)
    closers.append(lambda: dist_mod.teardown(dist_))
    dev = dist_.device
    say = (log or (lambda m: print(m, flush=True))) if dist_.is_main else (lambda m: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.kernels != "auto":
        os.environ["FASTMATH_KERNELS"] = "1" if cfg.kernels == "on" else "0"
    on_gpu = dev.type == "cuda"
    cfg = resolve_config(cfg, on_gpu, dist_.world_size)

    if run_dir is None:
        if dist_.is_main:
            run_dir = new_run_dir(Path(cfg.out)) if not dry_run else Path(cfg.out) / ".dry-run"
            run_dir.mkdir(parents=True, exist_ok=True)
        if dist_.enabled:  # every rank uses rank 0's directory
            names = [str(run_dir) if run_dir else None]
            torch.distributed.broadcast_object_list(names, src=0)
            run_dir = Path(names[0])
    prep = prepare_data(cfg, run_dir, dist_, log=say)
    tok = prep.tokenizer

    # Model: a preset from scratch (vocab replaced by the tokenizer's) or a checkpoint to fine-tune. Its
    # shape is known before any weight exists, so --dry-run never allocates a 7B model.
    finetune = is_checkpoint_dir(cfg.model)
    if finetune:
        args = read_model_args(cfg.model)
        tok.check_model_vocab(args.vocab_size)
    else:
        args = get_preset(cfg.model).replace(vocab_size=tok.vocab_size, max_seq_len=max(cfg.max_len, 512))
    micro = cfg.micro_batch_tokens
    accum = max(1, round(cfg.batch_tokens / (micro * dist_.world_size)))
    stream = D.PackedStream(prep.train, micro, accum, dist_.world_size, seed=cfg.seed)
    total_steps = cfg.max_steps or stream.steps_for_epochs(cfg.epochs)
    mem = estimate_memory(args, cfg, dist_.world_size)
    say(f"model {cfg.model}: {args.num_params() / 1e6:.2f}M parameters ({args.n_layers} layers, dim {args.dim}, "
        f"vocab {args.vocab_size}); {prep.counts['train_docs']} training documents, "
        f"{prep.counts['train_tokens']} tokens; packing efficiency {stream.efficiency():.1%} "
        f"({micro} tokens per micro-batch, {accum} per rank per step, {dist_.world_size} rank(s)); "
        f"{total_steps} steps; lr {cfg.lr:g}")
    if prep.counts.get("train_over_length"):
        say(f"{prep.counts['train_over_length']} documents longer than {cfg.max_len} tokens: "
            f"{prep.counts['train_dropped']} dropped, {prep.counts['train_truncated']} truncated")
    if dry_run:
        say(f"estimated memory per {'GPU' if on_gpu else 'process'}: {mem['total_gb']:.2f} GiB "
            f"(weights+grads+Adam {mem['states_gb']:.2f}, activations {mem['activations_gb']:.2f})")
        summary = {"params": args.num_params(), "steps": total_steps, "accum": accum,
                   "packing_efficiency": stream.efficiency(), "memory_gb": mem["total_gb"], **prep.counts}
        if dist_.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        dist_mod.teardown(dist_)
        return summary

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device="cpu", dtype=torch.float32) if finetune else Transformer(args)
    model.gradient_checkpointing = cfg.activation_checkpointing
    if not cfg.cpu_offload:
        model.to(dev)
    if cfg.compile:
        for block in model.layers:
            block.compile(dynamic=True)
    use_bf16 = on_gpu and cfg.dtype != "fp32"
    if dist_.fsdp:
        dist_mod.shard_model(model, torch.bfloat16 if use_bf16 else None, cfg.cpu_offload)
    opt_kw = {"fused": True} if on_gpu and not cfg.cpu_offload else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  weight_decay=cfg.weight_decay, **opt_kw)

    # Run directory and state.
    start_step, state = 0, {"tokens_seen": 0, "elapsed": 0.0, "untrained_acc": None, "last_good": None}
    ckpts = list_checkpoints(run_dir)
    if resume and ckpts:
        step_n, ck = ckpts[-1]
        dist_mod.load_sharded(model, optimizer, str(ck / "trainer_state" / "dcp"))
        state.update(json.loads((ck / "trainer_state" / "state.json").read_text()))
        rng = torch.load(ck / "trainer_state" / f"rng_rank{dist_.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if on_gpu and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        start_step = step_n
        say(f"resuming {run_dir} from step {step_n}")
    elif resume:
        say(f"{run_dir}: no checkpoint yet; starting it from step 0")
    metrics_path = run_dir / "metrics.jsonl"
    if dist_.is_main:  # a checkpoint holds the weights twice (HF + trainer state) and Adam's two moments
        need, free = 4 * sum(p.numel() * p.element_size() for p in model.parameters()), fsio.free_bytes(run_dir)
        if need > free:
            say(f"warning: a checkpoint needs about {fsio.human_bytes(need)} but only {fsio.human_bytes(free)} is "
                f"free on the file system of {run_dir}; the run will stop at its first checkpoint unless space is freed")
        if not resume:
            write_json_atomic(run_dir / "config.json", {"config": dataclasses.asdict(cfg), "versions": versions(),
                                                        "model_args": dataclasses.asdict(args), "steps": total_steps,
                                                        "accum": accum, "world_size": dist_.world_size,
                                                        "data": prep.counts})
        # Keep only metrics up to the resumed step, so the file reads like one uninterrupted run (a line cut
        # short by a full disk or a crash is dropped).
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [ln for ln in lines if (rec := _json_or_none(ln)) is not None and rec.get("step", 0) <= start_step]
        fsio.atomic_write(metrics_path, "".join(ln + "\n" for ln in kept))
        # Temporary directories of a save that was cut short are never read; they only hold disk space.
        for stale in [*(run_dir / "checkpoints").glob(".tmp_step_*"), run_dir / ".tmp_final"]:
            shutil.rmtree(stale, ignore_errors=True)
        point_latest(run_dir)
    mfile = fsio.AppendFile(metrics_path) if dist_.is_main else None
    if mfile:
        closers.append(mfile.close)

    def last_good_sentence() -> str:
        if state["last_good"] is None:
            return (f"no checkpoint was written yet; free some space, then start again with "
                    f"`fastmath train --resume {run_dir}`")
        return (f"the last good checkpoint is {run_dir / 'checkpoints' / ('step_%d' % state['last_good'])}; free some "
                f"space, then continue with `fastmath train --resume {run_dir}`")

    def record(rec):
        if mfile:
            try:
                mfile.append(json.dumps(rec) + "\n")
            except fsio.StorageError as e:
                raise fsio.StorageError(f"{e} at step {rec.get('step')}; {last_good_sentence()}") from None

    def agree(failure: BaseException | None, step: int, where: Path) -> None:
        """Every rank learns whether any rank failed (so none waits at a barrier for a rank that left);
        a storage failure becomes the one sentence, anything else goes up as it is."""
        flag = torch.tensor([0.0 if failure is None else 1.0])
        dist_mod.all_reduce(flag, dist_, op=torch.distributed.ReduceOp.MAX if dist_.enabled else None)
        if not float(flag):
            return
        if dist_.is_main:
            shutil.rmtree(where, ignore_errors=True)
        if isinstance(failure, fsio.StorageError):  # refused before writing: already the sentence
            raise failure
        if failure is not None and fsio.storage_cause(failure) is None:
            raise failure
        why = fsio.reason(failure) if failure is not None else "another rank could not write its part"
        raise fsio.StorageError(f"could not write the checkpoint of step {step} to {where.parent} ({why}); its "
                                f"partial files were removed and {last_good_sentence()}")

    def save(step: int, reason: str):
        """checkpoints/step_N: HF layout + trainer_state/, written to a temp dir and renamed (atomic).

        The free space is checked first; a write that fails anyway (ENOSPC, EIO, a vanished directory)
        removes the temp dir, keeps the last good checkpoint and `latest`, and raises fsio.StorageError.
        """
        final_dir = run_dir / "checkpoints" / f"step_{step}"
        tmp = run_dir / "checkpoints" / f".tmp_step_{step}"
        if state["last_good"] == step and (final_dir / "trainer_state" / "state.json").is_file():
            return  # resumed from this very checkpoint (a run that stopped after its last step): nothing new
        failure = None
        try:
            if dist_.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                need = (sum(t.numel() * t.element_size() for t in model.state_dict().values())
                        * 2  # HF weights + the fp32 weights in dcp (global sizes under FSDP)
                        + sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                              if torch.is_tensor(v))
                        + prep.tokenizer_path.stat().st_size)
                fsio.check_free(tmp.parent, need, f"the checkpoint of step {step}", last_good_sentence())
                (tmp / "trainer_state").mkdir(parents=True)
        except BaseException as e:  # noqa: B036 (torch.distributed.checkpoint raises BaseException subclasses)
            failure = e
        agree(failure, step, tmp)
        try:
            dist_mod.save_sharded(model, optimizer, str(tmp / "trainer_state" / "dcp"))
            full = dist_mod.full_state_dict(model, dist_)
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                   "cuda": torch.cuda.get_rng_state() if on_gpu else None}
            with open(tmp / "trainer_state" / f"rng_rank{dist_.rank}.pt", "wb") as f:
                torch.save(rng, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # noqa: B036
            failure = e
        agree(failure, step, tmp)
        try:
            if dist_.is_main:
                save_checkpoint(model, tmp, tokenizer_path=prep.tokenizer_path, state_dict=full)
                write_json_atomic(tmp / "trainer_state" / "state.json",
                                  {**state, "step": step, "epoch": stream.epoch_of_step(step), "reason": reason,
                                   "data_cursor": {"step": step, "seed": cfg.seed}, "last_good": step})
                fsio.fsync_dir(tmp / "trainer_state")
                fsio.fsync_dir(tmp)
                shutil.rmtree(final_dir, ignore_errors=True)
                os.replace(tmp, final_dir)
                fsio.fsync_dir(final_dir.parent)
        except BaseException as e:  # noqa: B036
            failure = e
        agree(failure, step, tmp)
        state["last_good"] = step
        if dist_.is_main:
            for _, old in list_checkpoints(run_dir)[:-cfg.keep] if cfg.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

    if not cfg.eval_max_new_tokens:
        longest = int((prep.val.lengths - prep.val.n_prompt).max()) if len(prep.val) else 256
        cfg = cfg.replace(eval_max_new_tokens=min(1024, int(1.25 * longest) + 8))
    if prep.eval_problems and state["untrained_acc"] is None and start_step == 0 and cfg.eval_problems:
        acc, _ = greedy_accuracy(model, tok, prep.eval_problems, cfg.template, cfg.eval_max_new_tokens, dist_)
        state["untrained_acc"] = acc
        say(f"greedy accuracy before training: {acc:.1%} on {len(prep.eval_problems)} held-out problems")
        record({"step": 0, "greedy_acc": acc})

    val_stream = D.PackedStream(prep.val, max(micro, int(prep.val.lengths.max()))) if len(prep.val) else None
    peak = peak_flops(dev)
    bar = None
    if dist_.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        closers.append(bar.close)
    model.train()
    t_last_save = time.time()
    flag = torch.zeros(2)  # [stop requested, time-based save due], agreed over ranks
    losses, step = [], start_step
    with _Signals() as sig:
        for step in range(start_step, total_steps):
            t0 = time.time()
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total_steps, cfg)
            batches, n_total = stream.step(step, dist_.rank)
            loss_local = accumulate_gradients(model, batches, n_total, dist_, dev, use_bf16)
            n_tokens = sum(len(b.tokens) for b in batches)
            sq = sum(int((np.diff(b.cu_seqlens).astype(np.int64) ** 2).sum()) for b in batches)
            stats = torch.tensor([loss_local, n_tokens, sq], dtype=torch.float64)
            dist_mod.all_reduce(stats, dist_)
            loss = float(stats[0]) / max(1, n_total)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                where = (f"the last good checkpoint is {run_dir / 'checkpoints' / ('step_%d' % state['last_good'])}"
                         if state["last_good"] is not None else "no checkpoint was written before it")
                if mfile:
                    record({"step": step + 1, "loss": loss, "error": "non-finite loss"})
                    mfile.close()
                if bar:
                    bar.close()
                dist_mod.teardown(dist_)
                raise TrainingDiverged(f"loss became {loss} at step {step + 1}; stopping ({where}). "
                                       "Lower --lr or check the data.")
            gnorm = None
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_gpu:
                torch.cuda.synchronize()
            dt = time.time() - t0
            tokens = int(stats[1])
            state["tokens_seen"] += tokens
            state["elapsed"] += dt
            losses.append(loss)
            tok_s = tokens / dt
            rec = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
                   "tokens": tokens, "targets": n_total, "tokens_per_s": tok_s, "epoch": stream.epoch_of_step(step + 1)}
            if peak:
                rec["mfu"] = flops_per_token(args, float(stats[2]) / tokens) * tok_s / (peak * dist_.world_size)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                record(rec)
            if bar:
                post = {"loss": f"{loss:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if "mfu" in rec:
                    post["mfu"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                ev = {"step": done}
                if val_stream:
                    ev["val_loss"] = validation_loss(model, val_stream, dist_, dev)
                if prep.eval_problems:
                    ev["greedy_acc"], _ = greedy_accuracy(model, tok, prep.eval_problems, cfg.template,
                                                          cfg.eval_max_new_tokens, dist_)
                record(ev)
            flag.zero_()
            flag[0] = 1.0 if sig.caught is not None else 0.0
            flag[1] = 1.0 if cfg.save_minutes and (time.time() - t_last_save) > 60 * cfg.save_minutes else 0.0
            dist_mod.all_reduce(flag, dist_, op=torch.distributed.ReduceOp.MAX if dist_.enabled else None)
            if done < total_steps and (flag[0] or flag[1] or (cfg.save_every and done % cfg.save_every == 0)):
                save(done, "signal" if flag[0] else "periodic")
                t_last_save = time.time()
            if flag[0]:
                if bar:
                    bar.close()
                say(f"stopped by signal after step {done}; checkpoint saved. Resume with: "
                    f"fastmath train --resume {run_dir}")
                if mfile:
                    mfile.close()
                dist_mod.teardown(dist_)
                return {"run_dir": str(run_dir), "stopped_at": done, "interrupted": True}
    if bar:
        bar.close()

    # End of training: checkpoint, final/ export, held-out evaluation, plot, summary.
    save(total_steps, "end")
    final_dir = run_dir / "final"
    full = dist_mod.full_state_dict(model, dist_)
    if dist_.is_main:
        tmp = run_dir / ".tmp_final"
        shutil.rmtree(tmp, ignore_errors=True)
        final_dtype = torch.bfloat16 if use_bf16 else torch.float32
        try:
            from .checkpoint import checkpoint_bytes

            fsio.check_free(run_dir, checkpoint_bytes(full, final_dtype) + prep.tokenizer_path.stat().st_size,
                            "the final export", last_good_sentence())
            save_checkpoint(model, tmp, tokenizer_path=prep.tokenizer_path, state_dict=full, dtype=final_dtype)
            fsio.fsync_dir(tmp)
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
            fsio.fsync_dir(run_dir)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, fsio.StorageError) or fsio.storage_cause(e) is None:
                raise
            raise fsio.StorageError(f"could not write the final export {final_dir} ({fsio.reason(e)}); its partial "
                                    f"files were removed and {last_good_sentence()}") from None
    summary = {"run_dir": str(run_dir), "steps": total_steps, "epochs": stream.epoch_of_step(total_steps),
               "tokens_seen": state["tokens_seen"], "train_seconds": state["elapsed"],
               "tokens_per_s": state["tokens_seen"] / max(1e-9, state["elapsed"]),
               "final_loss": losses[-1] if losses else None,
               # one step's loss is noisy: the mean of the last (up to) 10 steps of this process
               "final_loss_mean": float(np.mean(losses[-10:])) if losses else None,
               "final_loss_mean_steps": len(losses[-10:]), "packing_efficiency": stream.efficiency(),
               "lr": cfg.lr, "untrained_greedy_acc": state["untrained_acc"]}
    if val_stream:
        summary["val_loss"] = validation_loss(model, val_stream, dist_, dev)
    if prep.eval_problems and cfg.eval_problems:
        acc, rows = greedy_accuracy(model, tok, prep.eval_problems, cfg.template, cfg.eval_max_new_tokens, dist_)
        summary["greedy_acc"] = acc
        summary["eval_problems"] = len(prep.eval_problems)
        if dist_.is_main:
            fsio.atomic_write(run_dir / "greedy_eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows),
                              hint=f"training finished and {last_good_sentence()}")
    record({"step": total_steps, **{k: summary[k] for k in ("val_loss", "greedy_acc") if k in summary}})
    if mfile:
        mfile.close()
    if dist_.is_main:
        from .plotting import plot_loss_curve

        fsio.atomic_write_json(run_dir / "summary.json", summary, hint=f"training finished and {last_good_sentence()}")
        try:
            plot_loss_curve(metrics_path, run_dir / "loss.png", title=f"fastmath train: {cfg.model} ({run_dir.name})")
        except ImportError as e:  # matplotlib is a declared dependency, but a --no-deps install may lack it
            say(f"loss.png skipped: {e}")
        except fsio.StorageError as e:
            raise fsio.StorageError(f"{e}; training finished and {last_good_sentence()}") from None
        say(format_summary(summary))
    dist_mod.teardown(dist_)
    return summary


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _null():
    import contextlib

    return contextlib.nullcontext()


def format_summary(s: dict) -> str:
    """The final table printed by `fastmath train`."""
    rows = [("run", s["run_dir"]), ("steps", s["steps"]), ("epochs", f"{s['epochs']:.2f}"),
            ("tokens seen", f"{s['tokens_seen']:,}"), ("train time", f"{s['train_seconds']:.0f} s"),
            ("tokens/s", f"{s['tokens_per_s']:,.0f}"), ("packing efficiency", f"{s['packing_efficiency']:.1%}"),
            ("peak lr", f"{s['lr']:g}"),
            (f"train loss (mean of last {s.get('final_loss_mean_steps', 1)} steps)",
             f"{s['final_loss_mean']:.4f}" if s.get("final_loss_mean") is not None else "-")]
    if "val_loss" in s:
        rows.append(("validation loss", f"{s['val_loss']:.4f}"))
    if "greedy_acc" in s:
        before = s.get("untrained_greedy_acc")
        rows.append((f"greedy accuracy ({s['eval_problems']} held-out)",
                     f"{s['greedy_acc']:.1%} trained vs {before:.1%} untrained" if before is not None
                     else f"{s['greedy_acc']:.1%}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
