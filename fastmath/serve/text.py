"""Text on the server side: special-token aware encoding, chat rendering, token strings and the incremental
detokenizer that streams text without splitting a UTF-8 character or leaking the start of a stop string."""
from __future__ import annotations

import re

from ..data import CHAT, TEMPLATES, VICUNA_SYSTEM, render_prompt
from .protocol import bad

REPLACEMENT = "\ufffd"  # what SentencePiece's byte fallback decodes an incomplete UTF-8 sequence to


def special_tokens(tok) -> dict[str, int]:
    """Piece text -> id of the control tokens (<s>, </s>, <unk>), as transformers' LLaMA tokenizer parses them."""
    out = {}
    for i in (tok.bos_id, tok.eos_id, tok.unk_id):
        if i is not None and i >= 0:
            out[tok.id_to_piece(i)] = i
    return out


def encode_text(tok, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text` as transformers' LLaMA tokenizer gives them: BOS first (when asked), and the literal
    strings "<s>", "</s>" and "<unk>" as their control ids (lm-eval's remote tokenizer finds the EOS id so)."""
    specials = special_tokens(tok)
    ids = tok.encode("", bos=True) if add_bos else []  # [BOS], or nothing for a tokenizer without one (Qwen2.5)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for part in re.split(pattern, text) if specials else [text]:
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tok.encode(part, bos=False))
    return ids


def token_string(tok, i: int) -> str:
    """A token's own text (its piece with the SentencePiece space shown as a space; byte pieces as the byte)."""
    if getattr(tok, "kind", "sentencepiece") != "sentencepiece":  # byte-level BPE: the bytes the token stands for
        return tok.token_bytes(int(i)).decode("utf-8", "replace")
    piece = tok.id_to_piece(int(i))
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        b = int(piece[3:5], 16)
        return chr(b) if b < 0x80 else piece
    return piece.replace("\u2581", " ")


def chat_prompt_ids(tok, messages, template: str) -> list[int]:
    """Token ids of a chat request's prompt: under `chat`, the checkpoint's own chat template over every message
    (as vLLM and transformers' apply_chat_template(..., add_generation_prompt=True) give them, no second BOS);
    otherwise `render_chat` encoded with BOS."""
    if template != CHAT:
        return encode_text(tok, render_chat(messages, template), add_bos=True)
    from ..chat_template import ChatTemplateError, encode_chat

    # OpenAI's "developer" role is its newer name for "system", the role chat templates know
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                    for i, m in enumerate(messages)]
    try:
        return encode_chat(tok, conversation, add_generation_prompt=True)
    except ChatTemplateError as e:  # the template refused the conversation (e.g. roles must alternate)
        raise bad(str(e), "messages") from None


def render_chat(messages, template: str) -> str:
    """The prompt text of a conversation, as training renders one question.

    One user message (plus an optional system message) renders exactly as `fastmath.data.render_prompt`. The
    Vicuna template also takes several turns (FastChat's v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ...");
    other templates take a single user message. The prompt ends with the assistant's cue, so the reply follows.
    """
    system, turns = None, []
    for i, m in enumerate(messages):
        text = m.text(i)
        if m.role in ("system", "developer"):
            if turns:
                raise bad(f"messages[{i}]: a system message must come before the conversation", "messages")
            system = text if system is None else system + "\n" + text
        else:
            turns.append((m.role, text, i))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must be from the user", "messages")
    for (r1, _, _), (r2, _, i) in zip(turns, turns[1:]):
        if r1 == r2:
            raise bad(f"messages[{i}]: user and assistant messages must alternate", "messages")
    fmt = TEMPLATES.get(template, template)
    if len(turns) == 1 and system is None:
        return render_prompt(turns[0][1], template)
    if fmt != TEMPLATES["vicuna"]:
        raise bad(f"the prompt template {template!r} takes one user message (and no system message); "
                  "serve with --template vicuna for conversations", "messages")
    parts = [system if system is not None else VICUNA_SYSTEM]
    for role, text, _ in turns:
        parts.append(("USER: " if role == "user" else "ASSISTANT: ") + text.strip() + ("</s>" if role == "assistant" else ""))
    return " ".join(parts) + " ASSISTANT:"


def stop_holdback(text: str, stop_strings) -> int:
    """Characters at the end of `text` to hold back: the longest tail that could start one of the stop strings."""
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class IncrementalDetokenizer:
    """The text of a growing list of generated tokens, as deltas safe to send.

    Decodes only a short window (vLLM's prefix/read offsets): the text of ids[prefix:] minus that of
    ids[prefix:read] is the new text, so SentencePiece's leading-space rule cancels out. A window that ends in
    an incomplete UTF-8 sequence (the replacement character) is held until the character completes. Text that
    may be the beginning of a stop string is held back; text from a complete stop string on is never sent.
    `finish(final_text)` sends the rest of the engine's final text (already cut at a stop).
    """

    def __init__(self, tok, stop_strings=()):
        self.tok = tok
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""  # decoded text up to the read offset (complete characters)
        self.visible = ""  # self.text plus the complete characters of a window still waiting for a character
        self.sent = 0  # characters of self.visible already sent

    def add(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        delta = self.tok.decode(self.ids[self.prefix:])[len(before):]
        if delta.endswith(REPLACEMENT):  # an incomplete character: keep the window, show what precedes it
            self.visible = self.text + delta.rstrip(REPLACEMENT)
        else:
            self.text += delta
            self.visible = self.text
            self.prefix, self.read = self.read, len(self.ids)
        text = self.visible
        safe = len(text) - stop_holdback(text, self.stop_strings)
        for s in self.stop_strings:
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0:
                safe = min(safe, i)
        if safe <= self.sent:
            return ""
        out = text[self.sent:safe]
        self.sent = safe
        return out

    def finish(self, final_text: str | None) -> str:
        """The rest of the final text (the engine's, cut at a stop); nothing if it does not extend what was sent."""
        if final_text is None:
            final_text = self.visible
        sent = self.visible[:self.sent]
        if not final_text.startswith(sent):
            return ""
        self.visible = final_text
        self.sent = len(final_text)  # nothing more after finish
        return final_text[len(sent):]
