"""SentencePiece tokenizer with the LLaMA-2 conventions, and a trainer for small LLaMA-style tokenizers.

LLaMA-2 has no padding token. fastmath never pads inside a packed batch; where a pad id is needed
(padded batches for baselines, sampler bookkeeping) it uses the unknown token (id 0), as FastChat/Vicuna
training does. Labels use -100, never the pad id.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    """LLaMA-2 style SentencePiece tokenizer.

    Args:
        model_path: a SentencePiece `.model` file, or a checkpoint directory holding `tokenizer.model`.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        self.path = path
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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        out = self.sp.encode(texts)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad control ids are dropped."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

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
