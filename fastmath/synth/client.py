"""One retry policy around the official `openai` async client.

The client's own retries are off (`max_retries=0`) so retries never multiply. `ChatClient.complete`
retries 429 (waiting at least its Retry-After, and pausing every request of this client meanwhile),
5xx, 408/409, timeouts and connection errors, with exponential backoff and jitter; anything else
(401, 403, 404, 400, ...) is a `FatalAPIError` with one sentence for the user. The API key is only
handed to the openai client; messages never contain it.
"""
import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass

import openai

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class FatalAPIError(RuntimeError):
    """An API failure that retrying cannot fix; `str(e)` is one sentence meant for the user."""


class _RequestTimeout(Exception):
    """The whole request took longer than the per-request timeout."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Attempt a (0-based) waits uniform(d/2, d) with d = min(max_delay, base_delay * 2**a); a 429 with
    Retry-After waits that long (capped at max_retry_after) plus up to 10% jitter, never less.
    """
    max_retries: int = 8
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0
    connect_retries: int = 2  # retries for connection errors before any request ever succeeded

    def delay(self, attempt, retry_after=None, rng=random):
        if retry_after is not None:
            wait = min(max(retry_after, 0.0), self.max_retry_after)
            return wait + rng.uniform(0, 0.1 * wait)
        d = min(self.max_delay, self.base_delay * 2 ** attempt)
        return rng.uniform(d / 2, d)


@dataclass
class Reply:
    """One chat completion: the text (may be empty), token usage, the model name and the completion id the
    server reported."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    finish_reason: str | None
    id: str | None = None


def retry_after_seconds(headers):
    """Seconds asked for by `retry-after-ms` or `Retry-After` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Chat completions with one retry policy.

    Args:
        api_key: the key (never logged or stored by this class).
        base_url: an OpenAI-compatible endpoint, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
        model: model name sent with every request.
        timeout: per-request limit in seconds (whole request, enforced on top of the client's own timeout).
        policy: the RetryPolicy.
        temperature, max_tokens: sampling settings sent with every request (max_tokens None = server default).
    """

    def __init__(self, api_key, base_url, model, timeout=120.0, policy=RetryPolicy(), temperature=1.0,
                 max_tokens=None, rng=None):
        self.base_url = base_url or DEFAULT_BASE_URL
        self.model, self.timeout, self.policy = model, timeout, policy
        self.temperature, self.max_tokens = temperature, max_tokens
        self._key = api_key  # kept only to mask it in error messages
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout)
        self._rng = rng or random.Random()
        self._not_before = 0.0  # monotonic time before which no request starts (set by 429 Retry-After)
        self._ever_succeeded = False
        self.retries = 0  # total retried attempts, for the report

    async def close(self):
        await self._client.close()

    async def complete(self, messages):
        """Send one chat request, retrying per the policy.

        Returns:
            Reply.
        Raises:
            FatalAPIError: a non-retryable answer, or retries exhausted.
        """
        attempt = 0
        while True:
            pause = self._not_before - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                return await self._once(messages)
            except Exception as e:  # classified below; unknown errors propagate
                retry_after, reason = self._classify(e)
            limit = self.policy.max_retries
            if reason.startswith("connection") and not self._ever_succeeded:
                limit = min(limit, self.policy.connect_retries)
            if attempt >= limit:
                if reason.startswith("connection"):
                    raise FatalAPIError(f"Cannot reach the API endpoint {self.base_url} ({reason}).") from None
                raise FatalAPIError(
                    f"The API at {self.base_url} kept failing ({reason}) after {attempt} retries; "
                    "rerun the same command later to resume."
                ) from None
            wait = self.policy.delay(attempt, retry_after, self._rng)
            if retry_after is not None:
                self._not_before = max(self._not_before, time.monotonic() + wait)
            attempt += 1
            self.retries += 1
            await asyncio.sleep(wait)

    async def _once(self, messages):
        kwargs = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        try:
            response = await asyncio.wait_for(self._client.chat.completions.create(**kwargs), self.timeout)
        except asyncio.TimeoutError:
            raise _RequestTimeout() from None
        self._ever_succeeded = True
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice is not None and choice.message is not None else None) or ""
        usage = response.usage
        return Reply(
            text=text,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            model=response.model or self.model,
            finish_reason=getattr(choice, "finish_reason", None),
            id=getattr(response, "id", None),
        )

    def _classify(self, e):
        """(retry_after or None, reason) for a retryable error; raises FatalAPIError otherwise."""
        if isinstance(e, (openai.APITimeoutError, _RequestTimeout)):
            return None, f"timeout after {self.timeout:g} s"
        if isinstance(e, (openai.APIResponseValidationError, json.JSONDecodeError)):
            return None, "unreadable response body"
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            return None, f"connection error: {self._scrub(cause or e)}"
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            if status == 429:
                return retry_after_seconds(getattr(e.response, "headers", None)), "429 rate limited"
            if status >= 500 or status in (408, 409):
                return None, f"HTTP {status}"
            if status == 401:
                raise FatalAPIError(
                    f"The API at {self.base_url} rejected the key in OPENAI_API_KEY (401 Unauthorized)."
                ) from None
            detail = self._scrub(getattr(e, "message", "") or str(e))
            if status == 403:
                raise FatalAPIError(f"The API at {self.base_url} refused access (403 Forbidden): {detail}") from None
            if status == 404:
                raise FatalAPIError(
                    f"The API at {self.base_url} answered 404 for model '{self.model}' (wrong --base-url or "
                    f"--model?): {detail}"
                ) from None
            raise FatalAPIError(f"The API at {self.base_url} refused the request (HTTP {status}): {detail}") from None
        raise e

    def _scrub(self, text, limit=200):
        """One line of at most `limit` characters, with the API key masked should a server echo it."""
        text = " ".join(str(text).split())
        if self._key and len(self._key) >= 8:  # a short dummy key for a local server would mask ordinary words
            text = text.replace(self._key, "***")
        return text if len(text) <= limit else text[:limit] + "..."
