"""Tokenizers of checkpoints: SentencePiece (`tokenizer.model`, LLaMA-2, Mistral) or a Hugging Face
`tokenizer.json` (byte-level BPE: LLaMA-3.x, Qwen2.5), giving the ids and text transformers' tokenizer gives
for the same directory; and a trainer for small LLaMA-style SentencePiece tokenizers.

LLaMA-2 has no padding token. fastmath never pads inside a packed batch; where a pad id is needed
(padded batches for baselines, sampler bookkeeping) it uses the unknown token (id 0), as FastChat/Vicuna
training does (a tokenizer.json without pad or unknown token uses its EOS). Labels use -100, never the pad id.

EOS is a set (`eos_ids`): the tokenizer's EOS plus every id of generation_config.json's `eos_token_id`
(LLaMA-3.1-Instruct lists three); any of them ends a generation. `eos_id` is the one training appends.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None


def _token_text(tok) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    return tok.get("content") if isinstance(tok, dict) else tok


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied when tokenizer_config.json asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A checkpoint's tokenizer: SentencePiece or `tokenizer.json`, with transformers' conventions.

    Args:
        model_path: a SentencePiece `.model` file, a `tokenizer.json`, or a checkpoint directory holding either
            (`tokenizer.model` first when both are there: fastmath's own directories; the ids are the same).
    Attributes:
        kind: "sentencepiece" or "tokenizers"; vocab_size (with added tokens); bos_id (None when the tokenizer
        has no BOS, as Qwen2.5); eos_id; eos_ids (frozenset); unk_id (None when there is none); pad_id;
        chat_template (the checkpoint's jinja text or None) and special_tokens (their strings, for the template).
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() or not (path / "tokenizer.json").is_file() \
                else path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        self.path = path
        self.kind = "tokenizers" if path.suffix == ".json" else "sentencepiece"
        self._hf = None
        if self.kind == "tokenizers":
            self._load_tokenizer_json(path)
        else:
            self._load_sentencepiece(path)
        self._read_chat_template(path.parent)
        generation = _read_json(path.parent / "generation_config.json").get("eos_token_id")
        extra = generation if isinstance(generation, list) else [generation] if generation is not None else []
        self.eos_ids: frozenset[int] = frozenset([self.eos_id, *map(int, extra)])

    def _read_chat_template(self, directory: Path):
        """chat_template.jinja (transformers 5 writes it) or tokenizer_config.json's `chat_template` (a string, or
        a list of named templates of which "default" is used), and the special tokens a template may use."""
        config = _read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template: str | None = template
        self.special_tokens = {name: _token_text(config.get(name))
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _token_text(config.get(name)) is not None}

    def _load_sentencepiece(self, path: Path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

    def _load_tokenizer_json(self, path: Path):
        """tokenizer.json through the `tokenizers` library; special tokens from tokenizer_config.json (then the
        json's own post-processor decides where BOS goes, as transformers' fast tokenizer does)."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        self.sp = None
        config_path = path.parent / "tokenizer_config.json"
        config = _read_json(config_path)
        self.config = config
        self._as_transformers_llama(config)

        def special(name: str) -> int | None:
            text = _token_text(config.get(name))
            if text is None:
                return None
            i = self._hf.token_to_id(text)
            if i is None:
                raise ValueError(f"{config_path}: {name} {text!r} is not a token of {path.name}")
            return i

        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = special("bos_token")
        self.eos_id = special("eos_token")
        if self.eos_id is None:
            raise ValueError(f"{config_path}: no eos_token (fastmath needs one to end sequences)")
        self.unk_id = special("unk_token")
        pad = special("pad_token")
        self.pad_id = pad if pad is not None else self.unk_id if self.unk_id is not None else self.eos_id
        # transformers (5.x) skips this clean-up for BPE models, where it would remove real spaces (LLaMA-3 sets it)
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._hf.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    def _as_transformers_llama(self, config: dict):
        """transformers 5 builds a LlamaTokenizer's pipeline from its class, not from tokenizer.json (LLaMA-2 and
        Mistral v0.3 ship a SentencePiece-style BPE there): a Metaspace pre-tokenizer that prepends "▁" to the
        first word only (non-legacy) or to every split (legacy), no normalizer, and the matching decoder. The
        same here, so the ids are transformers'. Byte-level files keep their own pipeline, as transformers does."""
        from tokenizers import decoders, pre_tokenizers

        if config.get("tokenizer_class") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
            return
        if type(self._hf.model).__name__ != "BPE" or "ByteLevel" in repr(self._hf.pre_tokenizer):
            return
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = ("first" if not config.get("legacy", False) else "always") if add_prefix_space else "never"
        self._hf.normalizer = None
        self._hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        self._hf.decoder = decoders.Sequence(steps)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; `bos` adds the special tokens as transformers does by default (`add_special_tokens`:
        for a tokenizer.json, whatever its post-processor adds: LLaMA-3's BOS, nothing for Qwen2.5)."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=bos).ids
            return ids + [self.eos_id] if eos else ids
        ids = self.sp.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        if self._hf is not None:
            out = [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=bos)]
            return [ids + [self.eos_id] if eos else ids for ids in out]
        out = self.sp.encode(texts)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens dropped (transformers' `skip_special_tokens=True`)."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            text = self._hf.decode(ids, skip_special_tokens=True)
            return _clean_up_tokenization(text) if self._clean_up else text
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if self._hf is not None:
            return self._hf.id_to_token(int(i))
        return self.sp.id_to_piece(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The bytes a token stands for, for stop rules that look at raw text (a newline, the start of a stop
        string) on any tokenizer: SentencePiece byte pieces `<0x0A>` and the `▁` space, GPT-2 byte-level
        characters (`Ċ` is a newline, `Ġ` a space); special tokens give their text."""
        piece = self.id_to_piece(i)
        if self._hf is None:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode()  # an added token kept as text (or a non-byte-level vocabulary)

    def check_model_vocab(self, vocab_size: int, where: str = "model") -> None:
        """Raise a clear error if this tokenizer can emit ids the model has no embedding for."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"{self.path}: tokenizer has {self.vocab_size} tokens but the {where} has a vocabulary of "
                f"{vocab_size}; they do not belong together"
            )


def train_tokenizer(texts: Iterable[str], output_path: str | os.PathLike, vocab_size: int = 512) -> Tokenizer:
    """Train a small LLaMA-style SentencePiece model from text and write it to `output_path` (a .model file).

    Same conventions as LLaMA-2: BPE, digits split into single tokens, byte fallback (which alone takes
    256 ids, plus 3 for <unk>=0, <s>=1, </s>=2), identity normalisation, a dummy prefix space.
    `vocab_size` must therefore exceed 259 plus the distinct characters of the text.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            _train_spm(texts, prefix, vocab_size)
        except RuntimeError as e:
            if "Vocabulary size is smaller than required_chars" in str(e):
                raise ValueError(f"vocab_size {vocab_size} is too small for this text: byte fallback takes 256 "
                                 f"ids plus 3 special ones, and every distinct character needs one") from None
            raise
        data = Path(prefix + ".model").read_bytes()
    from .fsio import atomic_write

    atomic_write(output_path, data)  # a reader (or a resumed run) never sees a half-written model
    return Tokenizer(output_path)


def _train_spm(texts: list[str], prefix: str, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=min(4, os.cpu_count() or 1),
        minloglevel=2,
    )
