"""A checkpoint's own chat template, rendered as transformers' `apply_chat_template` renders it.

The template is untrusted text from the checkpoint: it runs in jinja2's immutable sandbox with exactly the
environment transformers gives it (trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not escape
HTML, `raise_exception`, `strftime_now`, a namespace that refuses underscore names), never as Python. The
special tokens of tokenizer_config.json (bos_token, eos_token, ...) are template variables, as in transformers.

The rendered text already carries the template's BOS (LLaMA-3.1, Mistral), so it is encoded without adding
another one (`encode_chat`).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


class ChatTemplateError(ValueError):
    """A template that does not compile, or that refuses the conversation (its `raise_exception`)."""


@lru_cache(maxsize=8)
def compile_chat_template(template: str):
    """The compiled template (cached by its text)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template stores underscore attribute {name!r}")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers some templates carry): rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def _plain(value):
    """Messages rebuilt from JSON types only (what transformers lets a template see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"chat messages hold JSON values only, got {type(value).__name__}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens: dict | None = None, tools: list[dict] | None = None, **kwargs) -> str:
    """The prompt text of `messages` ({"role", "content"} dicts) under `template`.

    Args:
        special_tokens: {"bos_token": "<|begin_of_text|>", "eos_token": ...} as tokenizer_config.json names them.
        kwargs: further template variables (e.g. LLaMA-3.1's `date_string`); they win over special tokens.
    Returns:
        What `tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False)` returns.
    Raises:
        ChatTemplateError: the template does not compile or rejects the conversation (its message included).
    """
    import jinja2

    if not messages:
        raise ChatTemplateError("a chat needs at least one message")
    # transformers drops None-valued keys (an API's content=None) before rendering
    messages = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(_plain(kwargs))
    try:
        return compile_chat_template(template).render(messages=messages, tools=_plain(tools), documents=None,
                                                      add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None


def chat_encoder(tokenizer):
    """The tokenizer that encodes rendered chat text: the checkpoint's tokenizer.json (its added-token parsing turns
    the special-token strings a template writes into their ids). A SentencePiece directory (Mistral v0.3 ships
    both files, one vocabulary) uses its sibling tokenizer.json."""
    if tokenizer.chat_template is None:
        raise ChatTemplateError(f"{tokenizer.path.parent}: no chat_template in tokenizer_config.json or chat_template.jinja")
    if tokenizer.kind == "tokenizers":
        return tokenizer
    sibling = tokenizer.path.parent / "tokenizer.json"
    if not sibling.is_file():
        raise ChatTemplateError(f"{tokenizer.path}: chat templates are encoded with the directory's tokenizer.json "
                                f"(special-token strings in the text need its added-token parsing); there is none")
    if getattr(tokenizer, "_chat_encoder", None) is None:  # loaded once per tokenizer (a 128K vocabulary is slow)
        from .tokenizer import Tokenizer

        tokenizer._chat_encoder = Tokenizer(sibling)
    return tokenizer._chat_encoder


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of the checkpoint's chat template applied to `messages`, with no BOS added on top of the
    template's own (transformers' `apply_chat_template(..., tokenize=True)`); special-token strings the template
    writes (<|eot_id|>, [INST], <|im_start|>) become their ids."""
    encoder = chat_encoder(tokenizer)
    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.special_tokens, **kwargs)
    return encoder.encode(text, bos=False)


def encode_sft_chats(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Training documents of (question, answer) pairs under the checkpoint's chat template, as TRL's SFTTrainer
    tokenizes a conversational prompt-completion example: the document is
    `apply_chat_template([user, assistant])`, and its first `len(apply_chat_template([user],
    add_generation_prompt=True))` tokens are the prompt (no loss). The answer therefore ends with whatever the
    template writes after an assistant turn (<|eot_id|> for LLaMA-3, <|im_end|> and a newline for Qwen2.5,
    </s> for Mistral); a template that writes no special token there gets the EOS appended, so a trained model
    still stops. Returns [(ids, number of prompt tokens)].

    Raises ChatTemplateError when the template does not render the answer after the generation prompt, or the
    prompt's tokens are not a prefix of the document's (the mask would then be wrong)."""
    encoder = chat_encoder(tokenizer)
    specials = tokenizer.special_tokens
    prompts, fulls = [], []
    for q, a in pairs:
        user = {"role": "user", "content": q}
        p = render_chat(tokenizer.chat_template, [user], True, specials)
        f = render_chat(tokenizer.chat_template, [user, {"role": "assistant", "content": a}], False, specials)
        if not f.startswith(p) or a.strip() not in f[len(p):]:
            raise ChatTemplateError(
                f"{tokenizer.path.parent}: the chat template does not render [user, assistant] as the [user] prompt "
                f"with its generation prompt followed by the answer, so the answer cannot be masked exactly "
                f"(question {q[:60]!r})")
        prompts.append(p)
        fulls.append(f)
    p_ids = encoder.encode_batch(prompts, bos=False)
    f_ids = encoder.encode_batch(fulls, bos=False)
    ends = chat_end_ids(tokenizer)
    out = []
    for (q, _), p, f in zip(pairs, p_ids, f_ids):
        if f[:len(p)] != p:
            raise ChatTemplateError(f"{tokenizer.path.parent}: the prompt's tokens are not a prefix of the "
                                    f"conversation's (question {q[:60]!r}); the answer cannot be masked exactly")
        out.append((f if ends else f + [tokenizer.eos_id], len(p)))
    return out


def _special_ids(encoder) -> set[int]:
    """Ids of the special added tokens of a tokenizer.json (the ones skip_special_tokens drops)."""
    return {i for i, t in encoder._hf.get_added_tokens_decoder().items() if t.special}


def chat_end_ids(tokenizer) -> frozenset[int]:
    """The special token the template writes right after an assistant's answer (its end of turn: LLaMA-3's
    <|eot_id|>, Qwen2.5's <|im_end|>, Mistral's </s>); empty when it writes none. A model trained with the
    template emits it at the end of an answer, so it belongs to the EOS set of the trained checkpoint."""
    encoder = chat_encoder(tokenizer)
    user, answer = {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}
    p = encoder.encode(render_chat(tokenizer.chat_template, [user], True, tokenizer.special_tokens), bos=False)
    f = encoder.encode(render_chat(tokenizer.chat_template, [user, answer], False, tokenizer.special_tokens), bos=False)
    special = _special_ids(encoder)
    for i in f[len(p):] if f[:len(p)] == p else []:
        if i in special:
            return frozenset([i])
    return frozenset()
