"""The FastAPI application: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health,
/metrics (Prometheus text) and vLLM's tokenizer endpoints at the root.

Every request becomes one engine request per prompt (the engine runs a prompt's n samples itself, sharing its
prefill); choices are numbered prompt-major (prompt p, sample s -> index p * n + s) as OpenAI numbers them.
A handler never blocks the event loop: it enqueues to the engine loop thread and awaits its asyncio queue,
checking between outputs whether the client is still there; a client that leaves is aborted at once.
"""
import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_loop import EngineLoop, QueueFull
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad,
                       check_chat, check_completion, error_body, prompt_list, stops)
from .text import IncrementalDetokenizer, chat_prompt_ids, encode_text, token_string

log = logging.getLogger("fastmath.serve")

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still connected


class ServerState:
    """What the handlers share: the engine loop, the tokenizer and the served model's facts."""

    def __init__(self, engine, tokenizer, model_name: str, template: str = "vicuna", api_key: str | None = None,
                 max_queue: int | None = None):
        from fastmath.engine import SamplingParams  # the server runs on the request-stream engine

        self.SamplingParams = SamplingParams
        self.loop = EngineLoop(engine, max_queue=max_queue)
        self.tok = tokenizer
        self.model_name = model_name
        self.template = template
        self.api_key = api_key.encode() if api_key else None
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = int(getattr(getattr(engine, "model", None), "args", tokenizer).vocab_size)
        self.created = int(time.time())


def create_app(engine, tokenizer, model_name: str, template: str = "vicuna", api_key: str | None = None,
               max_queue: int | None = None):
    """The ASGI app serving `engine` (a fastmath.engine.Engine); its lifespan starts and stops the engine loop."""
    state = ServerState(engine, tokenizer, model_name, template, api_key, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        yield
        # uvicorn has stopped accepting and let in-flight requests finish (SIGTERM); now end the engine thread.
        await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)

    app = FastAPI(title="fastmath serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fastmath = state

    # -- errors: always OpenAI's body, never FastAPI's {"detail": ...} ------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
        else:
            param = ".".join(loc) or None
            where = f"{param}: " if param else "request body: "
            msg = where + first.get("msg", "invalid request")
        return JSONResponse(error_body(400, msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)

    # -- auth: /v1/* only (health, metrics and the tokenizer stay open, as in vLLM) -------------------------
    # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware wraps `receive`, and
    # then a handler can no longer see that its client disconnected.
    if state.api_key is not None:
        app.add_middleware(APIKeyMiddleware, key=state.api_key)

    # -- plain endpoints ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse(error_body(503, "the engine loop has stopped"), status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "fastmath", "root": state.model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tok
        def piece(i):
            return None if i is None or i < 0 else tok.id_to_piece(i)

        byte_level = getattr(tok, "kind", "sentencepiece") != "sentencepiece"
        return {"tokenizer_class": "PreTrainedTokenizerFast" if byte_level else "LlamaTokenizer",
                "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(tok.unk_id),
                "pad_token": None, "add_bos_token": tok.bos_id is not None, "add_eos_token": False,
                "model_max_length": state.max_model_len, "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(state, req.model)
        ids = encode_text(state.tok, req.prompt, add_bos=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(state, req.model)
        check_ids(state, req.tokens, "tokens")
        return {"prompt": state.tok.decode(req.tokens)}

    # -- generation ---------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_completion(req)
        check_model(state, req.model)
        prompts, are_ids = prompt_list(req.prompt)
        prompt_ids = []
        for i, p in enumerate(prompts):
            if are_ids:
                check_ids(state, p, "prompt")
                prompt_ids.append(list(p))
            else:
                prompt_ids.append(encode_text(state.tok, p, add_bos=True))
        texts = prompts if not are_ids else [state.tok.decode(p) for p in prompt_ids]
        max_tokens = req.max_tokens if req.max_tokens is not None else state.max_model_len - max(map(len, prompt_ids))
        # max_tokens 0 (with echo) scores the prompt only: one token is still computed, but not returned
        check_lengths(state, prompt_ids, max(max_tokens, 1))
        params = make_params(state, req, max(max_tokens, 1), logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if req.echo else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = run_requests(state, rid, prompt_ids, params, request)
        if req.stream:
            first = await first_output(gen)
            return StreamingResponse(stream_completion(state, req, rid, texts, prompt_ids, first, gen),
                                     media_type="text/event-stream")
        results = await collect(gen, len(prompt_ids))
        return completion_response(state, req, rid, texts, prompt_ids, results)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_chat(req)
        check_model(state, req.model)
        ids = chat_prompt_ids(state.tok, req.messages, state.template)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limit if limit is not None else state.max_model_len - len(ids)
        check_lengths(state, [ids], max_tokens)
        params = make_params(state, req, max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = run_requests(state, rid, [ids], params, request)
        if req.stream:
            first = await first_output(gen)
            return StreamingResponse(stream_chat(state, req, rid, ids, first, gen), media_type="text/event-stream")
        results = await collect(gen, 1)
        return chat_response(state, req, rid, ids, results)

    return app


class APIKeyMiddleware:
    """401 with an OpenAI error body for /v1/* requests without 'Authorization: Bearer KEY' (constant-time)."""

    def __init__(self, app, key: bytes):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                body = error_body(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------
# checks and parameters


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                       "model", "model_not_found")


def check_ids(state: ServerState, ids, param: str) -> None:
    for t in ids:
        if not 0 <= t < state.vocab_size:
            raise bad(f"{param}: token id {t} is outside the vocabulary (0..{state.vocab_size - 1})", param)


def check_lengths(state: ServerState, prompt_ids, max_tokens: int) -> None:
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise bad("prompt must not be empty", "prompt")
        if len(p) >= state.max_model_len or len(p) + max_tokens > state.max_model_len:
            where = f"prompt {i} has" if len(prompt_ids) > 1 else "the prompt has"
            raise bad(f"This model's maximum context length is {state.max_model_len} tokens; {where} {len(p)} "
                      f"tokens and max_tokens is {max_tokens}: shorten the prompt or lower max_tokens",
                      "max_tokens" if len(p) < state.max_model_len else "prompt")


def make_params(state: ServerState, req, max_tokens: int, logprobs=None, prompt_logprobs=None):
    """The engine's SamplingParams for an OpenAI request (engine-side validation errors become a 400)."""
    top_k = req.top_k or 0
    try:
        return state.SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=max(top_k, 0),
            max_new_tokens=int(max_tokens), seed=None if req.seed is None else req.seed % 2**63,
            stop_at_answer=req.stop_at_answer, stop_strings=stops(req),
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise bad(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# running requests


async def run_requests(state: ServerState, rid: str, prompt_ids, params, request):
    """Submit one engine request per prompt; yield (prompt index, RequestOutput) as the engine produces them.

    Whatever ends this generator early (the client left, a refused request, cancellation) aborts the requests
    that have not finished, which frees their slots at once.
    """
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(item):
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    ids = [f"{rid}-{i}" for i in range(len(prompt_ids))]
    try:
        state.loop.submit([(ids[i], p, params) for i, p in enumerate(prompt_ids)], sink)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full") from None
    unfinished = set(ids)
    index = {r: i for i, r in enumerate(ids)}
    refused = False
    checked = time.monotonic()
    try:
        while unfinished:
            # outputs may arrive every step, so the client is checked on a clock, not only when none came
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection")  # nobody reads this answer
                checked = time.monotonic()
            try:
                item = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(item, BaseException):
                refused = True
                if isinstance(item, ValueError):  # EngineError: this request can never be served
                    raise bad(str(item))
                raise APIError(500, str(item))
            if item.finished:
                unfinished.discard(item.request_id)
            yield index[item.request_id], item
    finally:
        # the client left (or the stream was cancelled), or the engine refused one of the prompts
        for r in unfinished:
            state.loop.abort(r, disconnected=not refused)


async def first_output(gen):
    """The first output of a stream, awaited before the 200 goes out, so a refused request is still a 400."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


class _Result:
    """A prompt's outputs gathered: prompt ids and log-probs, and each sample's last SampleOutput."""

    def __init__(self):
        self.prompt_logprobs = None
        self.samples: dict[int, object] = {}


async def collect(gen, n_prompts: int) -> list[_Result]:
    results = [_Result() for _ in range(n_prompts)]
    async for p, out in gen:
        r = results[p]
        if out.prompt_logprobs is not None:
            r.prompt_logprobs = out.prompt_logprobs
        for s in out.outputs:
            r.samples[s.index] = s
    return results


# ----------------------------------------------------------------------------------------------------------
# responses


def finish_reason(s) -> str | None:
    if not s.finished:
        return None
    return "length" if s.finish_reason == "length" else "stop"


def usage(prompt_ids, results) -> dict:
    prompt = sum(len(p) for p in prompt_ids)
    completion = sum(len(s.token_ids) for r in results for s in r.samples.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def legacy_logprobs(state: ServerState, ids, lps, first_offset: int = 0, text_start: str = "") -> dict:
    """OpenAI's legacy completions `logprobs` object for tokens `ids` with per-token {id: logprob} dicts `lps`
    (None for a token without one, the prompt's first). text_offset is each token's start in the choice text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    det = IncrementalDetokenizer(state.tok)
    pos = first_offset
    for t, d in zip(ids, lps):
        tokens.append(token_string(state.tok, t))
        offsets.append(pos)
        pos += len(det.add([t]))
        if d is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(float(d[t]) if t in d else None)
            tops.append({token_string(state.tok, k): float(v) for k, v in d.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def completion_response(state, req, rid, texts, prompt_ids, results) -> dict:
    choices = []
    for p, r in enumerate(results):
        for s_i in range(req.n):
            s = r.samples.get(s_i)
            gen_ids = list(s.token_ids) if req.max_tokens != 0 else []
            text = (s.text or "") if req.max_tokens != 0 else ""
            lp = None
            if req.echo:
                text = texts[p] + text
            if req.logprobs is not None:
                if req.echo:
                    plp = r.prompt_logprobs or [None] * len(prompt_ids[p])
                    lp = legacy_logprobs(state, prompt_ids[p], plp)
                    gl = legacy_logprobs(state, gen_ids, (s.logprobs or [])[:len(gen_ids)], len(texts[p]))
                    lp = {k: lp[k] + gl[k] for k in lp}
                else:
                    lp = legacy_logprobs(state, gen_ids, (s.logprobs or [])[:len(gen_ids)])
            choices.append({"index": p * req.n + s_i, "text": text, "logprobs": lp,
                            "finish_reason": "length" if req.max_tokens == 0 else finish_reason(s)})
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
           "choices": choices, "usage": usage(prompt_ids, results)}
    if req.max_tokens == 0:
        out["usage"]["completion_tokens"] = 0
        out["usage"]["total_tokens"] = out["usage"]["prompt_tokens"]
    return out


def chat_response(state, req, rid, ids, results) -> dict:
    r = results[0]
    choices = [{"index": i, "message": {"role": "assistant", "content": r.samples[i].text or ""},
                "logprobs": None, "finish_reason": finish_reason(r.samples[i])} for i in range(req.n)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
            "choices": choices, "usage": usage([ids], results)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state, req, rid, first, gen, prompt_tokens: int, make_chunk, prefix=None):
    """Server-sent events: one chunk per choice whose safe text grew or that finished, then usage, [DONE]."""
    detoks, started = {}, set()
    created, completion = int(time.time()), 0

    async def outputs():
        if first is not None:
            yield first
        async for item in gen:
            yield item

    try:
        async for p, out in outputs():
            for s in out.outputs:
                i = p * req.n + s.index
                d = detoks.get(i)
                if d is None:
                    d = detoks[i] = IncrementalDetokenizer(state.tok, stops(req))
                delta = d.add(s.new_token_ids)
                if s.finished:
                    delta += d.finish(s.text)
                    completion += len(s.token_ids)
                if i not in started and prefix is not None:
                    delta = prefix(p) + delta
                started.add(i)
                if delta or s.finished:
                    yield _sse(make_chunk(created, i, delta, finish_reason(s)))
        if req.stream_options is not None and req.stream_options.include_usage:
            last = make_chunk(created, 0, "", None)
            last["choices"] = []
            last["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}
            yield _sse(last)
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()  # the client left mid-stream: abort what has not finished


async def stream_completion(state, req, rid, texts, prompt_ids, first, gen):
    def chunk(created, i, text, reason):
        return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

    prefix = (lambda p: texts[p]) if req.echo else None
    try:
        async for ev in _stream(state, req, rid, first, gen, sum(map(len, prompt_ids)), chunk, prefix):
            yield ev
    finally:
        await gen.aclose()


async def stream_chat(state, req, rid, ids, first, gen):
    def chunk(created, i, text, reason):
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": i, "delta": {"content": text} if text or reason is None else {},
                             "logprobs": None, "finish_reason": reason}]}

    created = int(time.time())
    try:
        for i in range(req.n):  # OpenAI opens each choice with the role
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]})
        async for ev in _stream(state, req, rid, first, gen, len(ids), chunk):
            yield ev
    finally:
        await gen.aclose()


# ----------------------------------------------------------------------------------------------------------
# metrics


def prometheus_text(state: ServerState) -> str:
    """Prometheus exposition text: engine gauges and counters (from the loop's snapshot) and server counters."""
    snap, c = state.loop.snapshot, dict(state.loop.counters)
    label = '{model_name="%s"}' % state.model_name.replace("\\", "\\\\").replace('"', '\\"')
    rows = [
        ("num_requests_running", "gauge", "Requests with samples being decoded.", snap.get("running", 0)),
        ("num_requests_waiting", "gauge", "Requests waiting for the engine.", snap.get("waiting", 0)),
        ("slots_in_use", "gauge", "Decode slots in use.", snap.get("slots_in_use", 0)),
        ("slots_max", "gauge", "Decode slots of the engine.", snap.get("max_slots", 0)),
        ("generation_tokens_total", "counter", "Tokens generated.", snap.get("generated_tokens", 0)),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", snap.get("prompt_tokens", 0)),
        ("requests_total", "counter", "Engine requests submitted (one per prompt).", c["requests"]),
        ("requests_aborted_total", "counter", "Engine requests aborted because the client left.", c["aborted"]),
        ("requests_rejected_total", "counter", "Requests answered 503 because the queue was full.",
         c["rejected_queue_full"]),
    ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP fastmath:{name} {help_}", f"# TYPE fastmath:{name} {kind}", f"fastmath:{name}{label} {value}"]
    return "\n".join(lines) + "\n"
