"""SFT data: reading problem files, the one prompt template, tokenization (cached), labels, and packing.

Pipeline: JSONL records (GSM8K, MATH, fastmath, or plain `text`) -> `Example(prompt, response)` with the
response ending in "The answer is: X" -> token ids `[BOS] prompt response [EOS]` with the number of prompt
tokens -> labels aligned with positions (label[t] = token[t+1]; -100 where token t+1 is part of the prompt
and at each document's last token) -> best-fit-decreasing packs of at most `budget` tokens with
`cu_seqlens` (int32) and per-document `positions`. No padding inside a pack.

`render_prompt` / `encode_prompt` are the only place the prompt format lives; the sampler uses them too. The
`chat` template is the checkpoint's own chat_template (fastmath.chat_template): the prompt is the rendered [user]
turn with the generation prompt, the document the rendered [user, assistant] conversation (as TRL's SFTTrainer
tokenizes conversational data).
This module does not import torch at import time (packing and tokenization are numpy).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# grading's \boxed{} reader is the only one, so training data and grading agree on a MATH solution's answer
from .grading import last_boxed  # noqa: F401

IGNORE = -100  # label of positions with no target (cross-entropy ignore_index)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# name -> format string with {question}. The Vicuna-v1.1 form is the paper's (and FastChat's): the prompt ends
# at "ASSISTANT:" and the response is tokenized on its own, so SentencePiece's dummy prefix supplies the space.
TEMPLATES = {
    "vicuna": VICUNA_SYSTEM + " USER: {question} ASSISTANT:",
    "plain": "Question: {question}\nAnswer:",
}
CHAT = "chat"  # the template name meaning: the checkpoint's own chat_template
ANSWER_PREFIX = "The answer is: "
CACHE_VERSION = 1  # bump when tokenization or answer rewriting changes, to invalidate caches


def check_template(template: str) -> None:
    """ValueError unless `template` is "chat", a named template or a format string with {question}."""
    if template != CHAT and "{question}" not in TEMPLATES.get(template, template):
        raise ValueError(f"unknown prompt template {template!r}: use one of {', '.join(TEMPLATES)}, {CHAT} (the "
                         "checkpoint's own chat template) or a format string containing {question}")


def check_chat_template(tokenizer, template: str) -> None:
    """A clear error when `template` is "chat" and the checkpoint has no chat template to render."""
    if template == CHAT and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--template chat renders the checkpoint's own chat template, but {tokenizer.path.parent} "
                         "has none (no chat_template in tokenizer_config.json, no chat_template.jinja); use "
                         f"{', '.join(TEMPLATES)} or a format string with {{question}}")


def render_prompt(question: str, template: str = "vicuna") -> str:
    """The prompt text for a question: a named template ("vicuna", "plain") or a format string with {question}
    (the `chat` template is the checkpoint's: fastmath.chat_template renders it)."""
    check_template(template)
    if template == CHAT:
        raise ValueError("the chat template is rendered from a checkpoint's tokenizer: use encode_prompt")
    return TEMPLATES.get(template, template).replace("{question}", question.strip())


def chat_messages(question: str) -> list[dict]:
    """The conversation of a question under the `chat` template: one user message."""
    return [{"role": "user", "content": question.strip()}]


def encode_prompt(tokenizer, question: str, template: str = "vicuna") -> list[int]:
    """Token ids of a prompt exactly as training sees them: BOS + render_prompt(question), or under `chat` the
    checkpoint's template of the user message with its generation prompt (its own BOS, none added)."""
    if template == CHAT:
        from .chat_template import encode_chat

        check_chat_template(tokenizer, template)
        return encode_chat(tokenizer, chat_messages(question), add_generation_prompt=True)
    return tokenizer.encode(render_prompt(question, template), bos=True, eos=False)


# ----------------------------------------------------------------------------------------------------------
# Records and answer rewriting

@dataclass
class Example:
    """One training document: `prompt` is None for plain text (every token is a target)."""

    prompt: str | None  # the question (rendered with the template at tokenization time)
    response: str  # ends with "The answer is: X" for problem records
    answer: str | None = None  # the gold answer, for greedy evaluation


_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_response(answer: str) -> tuple[str, str]:
    """GSM8K `answer` text -> (solution ending 'The answer is: N', N): drops <<calc>> notes, rewrites '#### N'."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("GSM8K answer has no '#### N' line")
    final = final.strip().replace(",", "")
    body = _CALC.sub("", body).rstrip()
    return (body + "\n" if body else "") + ANSWER_PREFIX + final, final


def math_response(solution: str) -> tuple[str, str]:
    """MATH solution -> (solution + 'The answer is: X' with X from the last \\boxed{}, X)."""
    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError("MATH solution has no \\boxed{} answer")
    return solution.rstrip() + "\n" + ANSWER_PREFIX + boxed, boxed


def fastmath_response(solution: str, answer) -> tuple[str, str]:
    """fastmath record -> solution ending with 'The answer is: X' (appended when missing)."""
    answer = str(answer).strip()
    sol = solution.rstrip()
    tail = sol.rsplit("\n", 1)[-1]
    if ANSWER_PREFIX.strip() not in tail:
        sol = sol + "\n" + ANSWER_PREFIX + answer
    return sol, answer


def record_to_example(rec) -> Example:
    """Detect the record's format and normalise it (ValueError with the reason if it is none of them)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")

    def text(key):
        v = rec[key]
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
        return v

    if "question" in rec and "solution" in rec and "answer" in rec:  # fastmath
        response, ans = fastmath_response(text("solution"), rec["answer"])
        return Example(text("question"), response, ans)
    if "question" in rec and "answer" in rec:  # GSM8K
        response, ans = gsm8k_response(text("answer"))
        return Example(text("question"), response, ans)
    if "problem" in rec and "solution" in rec:  # MATH
        response, ans = math_response(text("solution"))
        return Example(text("problem"), response, ans)
    if "text" in rec:  # plain text for pre-training
        return Example(None, text("text"), rec.get("answer"))
    raise ValueError(f"unknown record with keys {sorted(rec)[:8]}: expected GSM8K (question, answer), "
                     "MATH (problem, solution), fastmath (question, solution, answer) or text")


def iter_examples(path: str | os.PathLike):
    """Yield (line number, raw record, Example) for each non-blank line of a JSONL file; a missing file,
    malformed JSON or an unknown record is a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            try:
                yield lineno, rec, record_to_example(rec)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None


def read_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a JSONL file; any bad line is a ValueError naming the file and line."""
    path = Path(path)
    out = [ex for _, _, ex in iter_examples(path)]
    if not out:
        raise ValueError(f"{path}: empty file (no records)")
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenization (cached) and labels

@dataclass
class TokenizedDocs:
    """Documents as one flat token array.

    tokens: (N,) int32, all documents concatenated; offsets: (D+1,) int64 document starts;
    n_prompt: (D,) int32 number of leading tokens with no target (BOS + prompt); answers: gold answers or None.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    n_prompt: np.ndarray
    answers: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.n_prompt)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def select(self, idx: Sequence[int]) -> "TokenizedDocs":
        """A new TokenizedDocs holding documents `idx` in that order (repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([self.doc(i) for i in idx]) if len(idx) else np.zeros(0, np.int32)
        answers = [self.answers[i] for i in idx] if self.answers else []
        return TokenizedDocs(tokens.astype(np.int32), offsets, self.n_prompt[idx].copy(), answers)

    @staticmethod
    def concat(parts: Sequence["TokenizedDocs"]) -> "TokenizedDocs":
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedDocs(np.concatenate([p.tokens for p in parts]).astype(np.int32), offsets,
                             np.concatenate([p.n_prompt for p in parts]).astype(np.int32),
                             [a for p in parts for a in (p.answers or [None] * len(p))])


def tokenize_examples(examples: Sequence[Example], tokenizer, template: str = "vicuna",
                      progress: bool = False) -> TokenizedDocs:
    """Token ids `[BOS] prompt response [EOS]` per example; plain-text examples are `[BOS] text [EOS]`.

    The prompt and the response are encoded separately (so the prompt boundary is exact and identical to
    `encode_prompt`, which the sampler uses). Under the `chat` template an example is the checkpoint's template
    of [user, assistant], its prompt the [user] turn with the generation prompt, the answer ending with the
    template's own end of turn (fastmath.chat_template.encode_sft_chats).
    """
    if template == CHAT:
        check_chat_template(tokenizer, template)
    else:
        prompts = [render_prompt(e.prompt, template) if e.prompt is not None else None for e in examples]
        sep = response_separator(tokenizer)
    chunk = 4096
    ids_all: list[np.ndarray] = []
    n_prompt = np.zeros(len(examples), dtype=np.int32)
    rng = range(0, len(examples), chunk)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="tokenizing", unit_scale=chunk, unit="ex", leave=False)
    for s in rng:
        batch = examples[s:s + chunk]
        if template == CHAT:
            from .chat_template import encode_sft_chats

            has_prompt = [i for i, e in enumerate(batch) if e.prompt is not None]
            chats = dict(zip(has_prompt, encode_sft_chats(
                tokenizer, [(batch[i].prompt.strip(), batch[i].response) for i in has_prompt])))
            for i, e in enumerate(batch):
                if i not in chats:  # plain text: [BOS] text [EOS], as under the other templates
                    p = tokenizer.encode("", bos=True)
                    chats[i] = (p + tokenizer.encode(e.response, bos=False, eos=True), len(p))
                ids, n_prompt[s + i] = chats[i]
                ids_all.append(np.asarray(ids, dtype=np.int32))
            continue
        resp = tokenizer.encode_batch([(sep if e.prompt is not None else "") + e.response for e in batch],
                                      bos=False, eos=True)
        has_prompt = [i for i, p in enumerate(prompts[s:s + chunk]) if p is not None]
        pr = dict(zip(has_prompt, tokenizer.encode_batch([prompts[s + i] for i in has_prompt], bos=True)))
        for i, r in enumerate(resp):
            p = pr[i] if i in pr else tokenizer.encode("", bos=True)  # BOS alone, where the tokenizer has one
            n_prompt[s + i] = len(p)
            ids_all.append(np.asarray(p + r, dtype=np.int32))
    lengths = np.array([len(x) for x in ids_all], dtype=np.int64)
    offsets = np.zeros(len(ids_all) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(ids_all) if ids_all else np.zeros(0, np.int32)
    return TokenizedDocs(tokens, offsets, n_prompt, [e.answer for e in examples])


def response_separator(tokenizer) -> str:
    """What goes between a prompt ("... ASSISTANT:") and its response, which is tokenized on its own: nothing for
    SentencePiece-style tokenizers, whose dummy prefix already makes the response's first word "▁word" (the
    paper's and FastChat's "ASSISTANT: response"); a space for byte-level BPE (LLaMA-3, Qwen2.5), which has no
    dummy prefix, so the document is the same text "ASSISTANT: response" there too."""
    ids = tokenizer.encode("a", bos=False)
    return "" if ids and tokenizer.id_to_piece(ids[0]).startswith("\u2581") else " "


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digests(tokenizer, template: str) -> list[str]:
    """What the ids of a tokenizer depend on, for cache keys: its file; for a tokenizer.json also
    tokenizer_config.json (its BOS/EOS); under the `chat` template the template text and special tokens and, for
    a SentencePiece directory, the tokenizer.json that encodes chats."""
    parts = [file_digest(tokenizer.path)]
    config = tokenizer.path.parent / "tokenizer_config.json"
    if getattr(tokenizer, "kind", "sentencepiece") == "tokenizers" and config.is_file():
        parts.append(file_digest(config))
    if template == CHAT:
        parts += [tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens, sort_keys=True),
                  str(sorted(tokenizer.eos_ids))]
        sibling = tokenizer.path.parent / "tokenizer.json"
        if tokenizer.kind != "tokenizers" and sibling.is_file():
            parts.append(file_digest(sibling))
    return parts


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTMATH_CACHE", Path.home() / ".cache" / "fastmath")) / "tokens"


def _save_docs(path: Path, docs: TokenizedDocs) -> None:
    """Write a cache file atomically (concurrent ranks, a crash or a full disk never leave half a cache);
    fsio.StorageError when it cannot be written or would not fit."""
    from .fsio import atomic_open, check_free

    answers = np.array(json.dumps(docs.answers))
    need = docs.tokens.nbytes + docs.offsets.nbytes + docs.n_prompt.nbytes + answers.nbytes + 4096
    check_free(path.parent, need, "the tokenization cache")
    with atomic_open(path, "wb") as f:
        np.savez(f, tokens=docs.tokens, offsets=docs.offsets, n_prompt=docs.n_prompt, answers=answers)


def _load_docs(path: Path) -> TokenizedDocs:
    with np.load(path) as z:
        return TokenizedDocs(z["tokens"], z["offsets"], z["n_prompt"], json.loads(str(z["answers"])))


def load_tokenized(path: str | os.PathLike, tokenizer, template: str = "vicuna",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[TokenizedDocs, bool]:
    """Read and tokenize a JSONL file, through a cache keyed by (file bytes, tokenizer model, template).

    Returns (docs, hit) where hit says the cache answered. cache_dir=False-y string "" disables the cache.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    key = None
    if cache_dir:
        parts = [f"v{CACHE_VERSION}", file_digest(path), *tokenizer_digests(tokenizer, template),
                 TEMPLATES.get(template, template)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
        cached = Path(cache_dir) / f"{key}.npz"
        if cached.is_file():
            return _load_docs(cached), True
    docs = tokenize_examples(read_examples(path), tokenizer, template, progress=progress)
    if key is not None:
        from .fsio import StorageError, reason

        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            _save_docs(Path(cache_dir) / f"{key}.npz", docs)
        except (OSError, StorageError) as e:  # the cache only saves time: go on without it, and say so
            print(f"warning: tokenization cache not written ({reason(e)}); continuing without it",
                  file=sys.stderr, flush=True)
    return docs, False


def doc_labels(tokens: np.ndarray, n_prompt: int) -> np.ndarray:
    """Labels of one document, by definition (reference for tests): label[t] = tokens[t+1] if t+1 >= n_prompt."""
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    for t in range(len(tokens) - 1):
        if t + 1 >= n_prompt:
            labels[t] = tokens[t + 1]
    return labels


def flat_labels(docs: TokenizedDocs) -> np.ndarray:
    """Labels for every document at once, aligned with `docs.tokens` (vectorised `doc_labels`). (N,) int64."""
    n = len(docs.tokens)
    labels = np.full(n, IGNORE, dtype=np.int64)
    if n < 2:
        return labels
    labels[:-1] = docs.tokens[1:]
    pos = np.arange(n) - np.repeat(docs.offsets[:-1], docs.lengths)  # position within the document
    n_prompt = np.repeat(docs.n_prompt, docs.lengths)
    labels[pos + 1 < n_prompt] = IGNORE  # next token is part of the prompt
    labels[docs.offsets[1:] - 1] = IGNORE  # each document's last token predicts nothing
    return labels


def limit_length(docs: TokenizedDocs, max_len: int, mode: str = "drop") -> tuple[TokenizedDocs, dict]:
    """Apply the over-length policy. mode "drop" removes documents longer than max_len; "truncate" cuts
    them to max_len tokens (dropping those whose prompt alone fills max_len). Returns (docs, counts)."""
    if mode not in ("drop", "truncate"):
        raise ValueError(f"over-length mode must be 'drop' or 'truncate', got {mode!r}")
    lengths = docs.lengths
    over = lengths > max_len
    counts = {"over_length": int(over.sum()), "dropped": 0, "truncated": 0}
    if not over.any():
        return docs, counts
    if mode == "drop":
        keep = np.flatnonzero(~over)
        counts["dropped"] = int(over.sum())
        return docs.select(keep), counts
    keep = np.flatnonzero(~over | (docs.n_prompt < max_len))
    counts["dropped"] = len(docs) - len(keep)
    counts["truncated"] = int(over[keep].sum())
    parts = [docs.doc(i)[:max_len] for i in keep]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    answers = [docs.answers[i] for i in keep] if docs.answers else []
    tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    return TokenizedDocs(tokens, offsets, docs.n_prompt[keep].copy(), answers), counts


def mix(parts: Sequence[TokenizedDocs], weights: Sequence[float], seed: int = 0) -> TokenizedDocs:
    """Mix datasets: weight w repeats a dataset floor(w) times plus a seeded random w-floor(w) share of it
    (weights 1, 1 = plain concatenation; 0.5 = half of it; 3 = three copies per epoch)."""
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} data files but {len(weights)} mixing weights")
    rng = np.random.default_rng([seed, 0x6d6978])
    out = []
    for p, w in zip(parts, weights):
        if w < 0:
            raise ValueError(f"mixing weight must be >= 0, got {w}")
        whole, frac = int(w), w - int(w)
        idx = [np.arange(len(p))] * whole
        if frac > 0:
            idx.append(np.sort(rng.permutation(len(p))[:int(round(frac * len(p)))]))
        if idx:
            out.append(p.select(np.concatenate(idx)))
    if not out or sum(len(o) for o in out) == 0:
        raise ValueError("the mixing weights select no examples")
    return TokenizedDocs.concat(out)


# ----------------------------------------------------------------------------------------------------------
# Packing

def pack_best_fit(lengths: Sequence[int], budget: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit-decreasing bin packing of documents into packs of at most `budget` tokens.

    Documents are taken longest first (ties in `order`, default index order); each goes into the open pack
    with the least room that still fits it, or a new pack. Every length must be <= budget.
    Returns a list of packs, each a list of document indices.
    """
    import bisect

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"a document of {int(lengths.max())} tokens exceeds the pack budget {budget}")
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    order = order[np.argsort(-lengths[order], kind="stable")]
    packs: list[list[int]] = []
    caps: list[int] = []  # sorted distinct remaining capacities that have at least one open pack
    by_cap: dict[int, list[int]] = {}  # remaining capacity -> pack ids
    for d in order.tolist():
        n = int(lengths[d])
        i = bisect.bisect_left(caps, n)
        if i < len(caps):
            c = caps[i]
            b = by_cap[c].pop()
            if not by_cap[c]:
                del by_cap[c], caps[i]
            packs[b].append(d)
            c -= n
        else:
            b, c = len(packs), budget - n
            packs.append([d])
        if c > 0:
            if c not in by_cap:
                bisect.insort(caps, c)
                by_cap[c] = []
            by_cap[c].append(b)
    return packs


@dataclass
class PackedBatch:
    """One micro-batch: documents concatenated, no padding.

    tokens, labels, positions: (T,) int64; cu_seqlens: (D+1,) int32; max_seqlen: int; n_targets: labels != -100.
    """

    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    n_targets: int

    def to_torch(self, device=None) -> dict:
        """Keyword arguments for `model(...)` (tokens, positions, cu_seqlens, max_seqlen, labels) on `device`."""
        import torch

        def t(a):
            return torch.from_numpy(a).to(device, non_blocking=True)

        return {"tokens": t(self.tokens), "positions": t(self.positions), "cu_seqlens": t(self.cu_seqlens),
                "max_seqlen": self.max_seqlen, "labels": t(self.labels)}


def make_batch(docs: TokenizedDocs, labels: np.ndarray, doc_ids: Sequence[int]) -> PackedBatch:
    """Build the packed micro-batch of documents `doc_ids` (labels from `flat_labels(docs)`)."""
    lengths = docs.lengths[np.asarray(doc_ids, dtype=np.int64)]
    cu = np.zeros(len(doc_ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    slices = [slice(docs.offsets[d], docs.offsets[d + 1]) for d in doc_ids]
    tokens = np.concatenate([docs.tokens[s] for s in slices]).astype(np.int64)
    lab = np.concatenate([labels[s] for s in slices])
    positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    return PackedBatch(tokens, lab, positions, cu, int(lengths.max()), int((lab != IGNORE).sum()))


class PackedStream:
    """The deterministic sequence of micro-batches of a training run, shared by every rank.

    Each epoch shuffles the documents (seed, epoch), packs them best-fit-decreasing into packs of at most
    `budget` tokens, and shuffles the packs. The packs of all epochs form one stream; optimizer step s takes
    packs [s*G, (s+1)*G) with G = world_size * accum, and hands each rank `accum` of them, balancing tokens
    (so every rank runs the same number of micro-batches). The last step may borrow packs from the next
    epoch, so no document is dropped. The data cursor of a run is just its step number.
    """

    def __init__(self, docs: TokenizedDocs, budget: int, accum: int = 1, world_size: int = 1, seed: int = 0):
        if budget < int(docs.lengths.max()):
            raise ValueError(f"micro-batch budget {budget} is smaller than the longest document "
                             f"({int(docs.lengths.max())} tokens); raise it or lower max_len")
        self.docs, self.budget, self.accum, self.world_size, self.seed = docs, budget, accum, world_size, seed
        self.labels = flat_labels(docs)
        self.group = accum * world_size
        self._epochs: dict[int, list[list[int]]] = {}
        self._counts: dict[int, int] = {}

    def epoch_packs(self, epoch: int) -> list[list[int]]:
        """The packs of one epoch, in training order (computed on demand; the last two are kept)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            packs = pack_best_fit(self.docs.lengths, self.budget, order=rng.permutation(len(self.docs)))
            self._epochs = {k: v for k, v in self._epochs.items() if k == epoch - 1}  # keep memory bounded
            self._epochs[epoch] = [packs[i] for i in rng.permutation(len(packs))]
            self._counts[epoch] = len(packs)
        return self._epochs[epoch]

    def _count(self, epoch: int) -> int:
        if epoch not in self._counts:
            self.epoch_packs(epoch)
        return self._counts[epoch]

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps that cover `epochs` passes (fractional allowed), rounding up."""
        whole = int(epochs)
        n = sum(self._count(e) for e in range(whole))
        if epochs > whole:
            n += int(round((epochs - whole) * self._count(whole)))
        return max(1, -(-n // self.group))

    def packs_of_step(self, step: int) -> list[list[int]]:
        """The G packs (lists of document ids) of optimizer step `step` (0-based)."""
        start, end = step * self.group, (step + 1) * self.group
        out, epoch, base = [], 0, 0
        while base < end:
            n = self._count(epoch)
            lo, hi = max(start, base), min(end, base + n)
            if lo < hi:
                out.extend(self.epoch_packs(epoch)[lo - base:hi - base])
            base += n
            epoch += 1
        return out

    def epoch_of_step(self, step: int) -> float:
        """Epochs completed (fractional) after `step` steps."""
        done, epoch, base = step * self.group, 0, 0
        while done >= base + self._count(epoch):
            base += self._count(epoch)
            epoch += 1
        return epoch + (done - base) / self._count(epoch)

    def step(self, step: int, rank: int = 0) -> tuple[list[PackedBatch], int]:
        """This rank's `accum` micro-batches of step `step`, and the target count of the whole global batch."""
        packs = self.packs_of_step(step)
        batches = [make_batch(self.docs, self.labels, p) for p in packs]
        n_total = sum(b.n_targets for b in batches)
        # Longest-processing-time assignment with exactly `accum` packs per rank.
        load = [0] * self.world_size
        mine = [[] for _ in range(self.world_size)]
        for i in sorted(range(len(batches)), key=lambda i: -len(batches[i].tokens)):
            r = min((r for r in range(self.world_size) if len(mine[r]) < self.accum), key=lambda r: load[r])
            mine[r].append(i)
            load[r] += len(batches[i].tokens)
        return [batches[i] for i in sorted(mine[rank])], n_total

    def efficiency(self, epoch: int = 0) -> float:
        """Packing efficiency of an epoch: real tokens / (packs * budget)."""
        packs = self.epoch_packs(epoch)
        return float(self.docs.lengths.sum()) / (len(packs) * self.budget)


def texts_for_tokenizer(examples: Iterable[Example], template: str = "vicuna") -> Iterable[str]:
    """The texts a tokenizer trained for these examples should see (prompt and response)."""
    if template == CHAT:
        raise ValueError("--template chat renders the checkpoint's own chat template: it needs --model to be a "
                         "checkpoint directory with one (a tokenizer trained on the fly has none)")
    for e in examples:
        if e.prompt is not None:
            yield render_prompt(e.prompt, template)
        yield e.response
