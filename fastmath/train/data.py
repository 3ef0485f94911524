"""The trainer's data: read (or generate) the examples, get a tokenizer, tokenize (cached), split off the
held-out validation documents and greedy-evaluation problems."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data as D
from ..runs import is_model_path
from ..synth import procedural as P
from ..synth.procedural import parse_procedural
from .config import TrainConfig

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
    from ..tokenizer import Tokenizer, train_tokenizer

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
    # A checkpoint's tokenizer is tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE: LLaMA-3.x,
    # Qwen2.5); the run keeps its path, and every export copies it with its config files (copy_tokenizer).
    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
        if not tok_path.exists():
            raise ValueError(f"--tokenizer {cfg.tokenizer}: no such file or directory")
    elif is_model_path(cfg.model):
        tok_path = Path(cfg.model)
        if not any((tok_path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
            raise ValueError(f"{cfg.model}: checkpoint has neither tokenizer.model nor tokenizer.json; pass --tokenizer")
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
        from ..distributed import barrier

        barrier(dist_)
    tokenizer = Tokenizer(tok_path)
    tok_path = tokenizer.path  # the file itself (a directory resolves to its tokenizer.model or tokenizer.json)
    D.check_chat_template(tokenizer, cfg.template)
    if cfg.template == D.CHAT:
        # The template's end of turn (<|eot_id|>, <|im_end|>) ends every trained answer, so it ends generation
        # too: greedy evaluation here, and the exported checkpoints' generation_config.json.
        from ..chat_template import chat_end_ids

        tokenizer.eos_ids = tokenizer.eos_ids | chat_end_ids(tokenizer)

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


