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


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of the checkpoint's chat template applied to `messages`, with no BOS added on top of the
    template's own (transformers' `apply_chat_template(..., tokenize=True)`); special-token strings the template
    writes (<|eot_id|>, [INST], <|im_start|>) become their ids."""
    if tokenizer.chat_template is None:
        raise ChatTemplateError(f"{tokenizer.path.parent}: no chat_template in tokenizer_config.json or chat_template.jinja")
    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.special_tokens, **kwargs)
    encoder = tokenizer
    if tokenizer.kind != "tokenizers":  # e.g. Mistral v0.3 ships both files; the same vocabulary
        sibling = tokenizer.path.parent / "tokenizer.json"
        if not sibling.is_file():
            raise ChatTemplateError(f"{tokenizer.path}: chat templates are encoded with the directory's tokenizer.json "
                                    f"(special-token strings in the text need its added-token parsing); there is none")
        from .tokenizer import Tokenizer

        encoder = Tokenizer(sibling)
    return encoder.encode(text, bos=False)
