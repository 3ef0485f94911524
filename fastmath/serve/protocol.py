"""The OpenAI request shapes the server accepts, their validation, and OpenAI-style error bodies.

Requests are pydantic models, so a wrong type (a string for `max_tokens`, a number for `prompt`) is a 400 that
names the field. Prompt token ids are strict integers: a string never turns into a token id by coercion.
Fields OpenAI has but fastmath cannot honour (penalties, logit_bias, best_of > n, suffix) are a 400 naming
the field, never silently ignored. vLLM's extensions `top_k`, `stop_token_ids`, `ignore_eos` are accepted, and
fastmath's `stop_at_answer` (stop after a completed "The answer is: ..." line; off unless asked).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default cap; OpenAI's legacy API allows 5)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; lm-eval tasks sometimes send more)


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             503: "service_unavailable", 500: "internal_server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    # Unknown fields are ignored (clients add `user`, `metadata`, ...), as OpenAI's and vLLM's servers do.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    n: StrictInt = 1
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    top_k: StrictInt | None = None  # vLLM extension; 0 or -1 = off
    stop: Union[StrictStr, list[StrictStr], None] = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension
    ignore_eos: StrictBool = False  # vLLM extension
    stop_at_answer: StrictBool = False  # fastmath extension
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: StrictStr | None = None


PromptType = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_Common):
    prompt: PromptType
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[StrictStr, list[dict], None] = None

    def text(self, i: int) -> str:
        """The message's text; content parts must be {"type": "text", "text": ...}."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: the rest of the context
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[StrictInt]


def check_common(req: _Common) -> None:
    """Range checks shared by both endpoints; each error names the OpenAI field."""
    if req.n < 1:
        raise bad(f"n must be at least 1, got {req.n}", "n")
    if req.temperature is not None and not req.temperature >= 0:  # also rejects NaN
        raise bad(f"temperature must be >= 0, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise bad(f"top_k must be -1, 0 (off) or positive, got {req.top_k}", "top_k")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(f"{name} is not supported by fastmath serve (send 0 or omit it)", name)
    if req.logit_bias:
        raise bad("logit_bias is not supported by fastmath serve", "logit_bias")
    if len(stops(req)) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop strings, got {len(stops(req))}", "stop")


def stops(req: _Common) -> tuple[str, ...]:
    s = req.stop
    if s is None:
        return ()
    return tuple(x for x in ([s] if isinstance(s, str) else s) if x)


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.max_tokens is not None and req.max_tokens < 0:
        raise bad(f"max_tokens must be >= 0, got {req.max_tokens}", "max_tokens")
    if req.max_tokens == 0 and not req.echo:
        raise bad("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise bad("best_of other than n is not supported by fastmath serve", "best_of")
    if req.suffix:
        raise bad("suffix is not supported by fastmath serve", "suffix")
    if req.stream and req.logprobs is not None:
        raise bad("logprobs with stream=true is not supported by fastmath serve; request without stream",
                  "logprobs")
    p = req.prompt
    if isinstance(p, list) and (len(p) == 0 or any(isinstance(x, list) and not x for x in p)):
        raise bad("prompt must not be empty", "prompt")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name)
        if v is not None and v < 1:
            raise bad(f"{name} must be at least 1, got {v}", name)
    if req.logprobs:
        raise bad("logprobs are not supported on /v1/chat/completions by fastmath serve; use /v1/completions",
                  "logprobs")


def prompt_list(p) -> tuple[list, bool]:
    """(prompts, are_token_ids): the four prompt forms as a list of strings or a list of token-id lists."""
    if isinstance(p, str):
        return [p], False
    if all(isinstance(x, str) for x in p):
        return list(p), False
    if all(isinstance(x, int) for x in p):
        return [list(p)], True
    return [list(x) for x in p], True
