"""`fastmath serve` through real clients (the official openai client, httpx, urllib, lm-eval's remote tokenizer):
OpenAI's shapes, greedy text equal to the model's own greedy decoding, streaming equal to non-streaming (stop
strings held back), seeded n=8 equal to the offline engine while other requests run, echo log-probs equal to an
fp64 forward of the model, bad input answered 400/404/401 with OpenAI error bodies, a client that leaves is
aborted and its slots freed, a full queue answers 503, and SIGTERM finishes in-flight requests before exiting.

One server per module (a subprocess of `fastmath serve` on 127.0.0.1), plus a one-slot server for the queue and
SIGTERM test.
"""
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_util import Server, http, make_checkpoint  # noqa: E402
from engine_fixture import greedy_reference  # noqa: E402

from fastmath.checkpoint import load_model  # noqa: E402
from fastmath.serve.text import encode_text  # noqa: E402
from fastmath.tokenizer import Tokenizer  # noqa: E402

KEY = "sk-serve-test-7d1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
PROMPTS = ["What is 12 plus 30?", "Tom has 5 apples and eats 2. How many are left?", "Compute 7 times 8."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--api-key", KEY, "--served-model-name", NAME)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt).eval()


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer(ckpt)


def wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------
# shapes and the model behind them


def test_models_completions_chat_shapes_and_prompt_major_order(client, server, tok):
    assert [m.id for m in client.models.list().data] == [NAME]
    one = client.completions.create(model=NAME, prompt=PROMPTS[0], temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    c = one.choices[0]
    # OpenAI's default max_tokens is 16
    assert one.usage.completion_tokens <= 16 and (c.finish_reason == "stop" or one.usage.completion_tokens == 16)
    assert one.usage.prompt_tokens == len(encode_text(tok, PROMPTS[0])) == len(tok.encode(PROMPTS[0], bos=True))

    singles = [client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
               for p in PROMPTS]
    many = client.completions.create(model=NAME, prompt=PROMPTS, n=2, max_tokens=10, temperature=0)
    assert [ch.index for ch in many.choices] == list(range(6))
    assert [ch.text for ch in sorted(many.choices, key=lambda ch: ch.index)] == [t for t in singles for _ in (0, 1)]
    # token ids are used exactly as given: the BOS-prefixed ids of the string prompt give the same text
    ids = [tok.encode(p, bos=True) for p in PROMPTS[:2]]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert [ch.text for ch in by_ids.choices] == singles[:2]
    assert client.completions.create(model=NAME, prompt=ids[0], max_tokens=10, temperature=0).choices[0].text == singles[0]
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[1]}], n=2,
                                          max_tokens=12, temperature=0, seed=3)
    assert chat.object == "chat.completion" and [ch.index for ch in chat.choices] == [0, 1]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == chat.choices[1].message.content
    # the chat prompt is the training template (Vicuna v1.1) rendered exactly as fastmath.data renders it
    from fastmath.data import render_prompt
    assert chat.usage.prompt_tokens == len(tok.encode(render_prompt(PROMPTS[1]), bos=True))


def test_greedy_text_is_the_models_own_greedy_decoding(client, model, tok):
    for p in PROMPTS:
        ids = tok.encode(p, bos=True)
        ref = greedy_reference(model, ids, 14, tok.eos_id)
        ref_text = tok.decode([t for t in ref if t != tok.eos_id])
        got = client.completions.create(model=NAME, prompt=p, max_tokens=14, temperature=0)
        assert got.choices[0].text == ref_text
        assert got.usage.completion_tokens == len(ref)


def test_default_chat_max_tokens_is_the_rest_of_the_context(server, tok):
    status, body = http("POST", server.base_url + "/chat/completions",
                        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
                         "temperature": 0}, AUTH, timeout=300)
    assert status == 200, body
    u = body["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] == 1024 and body["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------------------------------------
# streaming


def _stream_text(stream, chat=False):
    parts, reasons = {}, {}
    for ch in stream:
        for c in ch.choices:
            piece = (c.delta.content or "") if chat else c.text
            parts.setdefault(c.index, []).append(piece)
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return {i: "".join(p) for i, p in parts.items()}, parts, reasons


def test_streaming_equals_non_streamed_greedy_text_and_holds_back_stop_strings(client):
    for p in PROMPTS:
        full = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0)
        texts, _, reasons = _stream_text(client.completions.create(model=NAME, prompt=p, max_tokens=40,
                                                                   temperature=0, stream=True))
        assert texts[0] == full.choices[0].text and reasons[0] == full.choices[0].finish_reason
        chat_full = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}],
                                                   max_tokens=30, temperature=0)
        ctexts, _, _ = _stream_text(client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], max_tokens=30, temperature=0, stream=True), True)
        assert ctexts[0] == chat_full.choices[0].message.content

        # a stop string taken from the middle of the greedy text: the text is cut before it, streamed or not,
        # and no streamed chunk ever shows its first characters
        text = full.choices[0].text
        starts = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip()]
        if not starts:
            continue
        stop = text[starts[0]:starts[0] + 3]
        cut = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
        stexts, chunks, sreasons = _stream_text(client.completions.create(
            model=NAME, prompt=p, max_tokens=40, temperature=0, stop=[stop], stream=True))
        # equal texts also mean the stop's first characters were held back: a sent chunk is never taken back
        assert stexts[0] == cut.choices[0].text and sreasons[0] == "stop"
        assert all(stop not in c for c in chunks[0])


def test_stream_usage_and_n_choices(client):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], n=3, max_tokens=8, temperature=0.9,
                                            seed=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    texts, _, reasons = _stream_text(chunks[:-1])
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], n=3, max_tokens=8, temperature=0.9, seed=5)
    assert texts == {c.index: c.text for c in full.choices} and set(reasons) == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


# ----------------------------------------------------------------------------------------------------------
# seeds: a request's samples do not depend on what runs beside it


def test_seeded_n8_equals_the_offline_engine_while_other_requests_run(client, model, tok):
    from fastmath.engine import Engine, SamplingParams

    prompt = PROMPTS[2]
    params = SamplingParams(n=8, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=1234, stop_at_answer=False)
    engine = Engine(model, tok)
    engine.add_request("offline", tok.encode(prompt, bos=True), params)
    offline = {}
    while engine.has_unfinished():
        for out in engine.step():
            for s in out.outputs:
                if s.finished:
                    offline[s.index] = s.text
    assert len(offline) == 8 and len(set(offline.values())) > 1  # really sampled

    def other(i):  # unseeded and differently seeded traffic, some of it streamed
        kw = dict(model=NAME, prompt=PROMPTS[i % 2], n=1 + i % 3, max_tokens=20 + i, temperature=0.8)
        if i % 2:
            kw["seed"] = i
        if i % 3 == 0:
            return list(client.completions.create(stream=True, **kw))
        return client.completions.create(**kw)

    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(other, i) for i in range(6)]
        mine = pool.submit(client.completions.create, model=NAME, prompt=prompt, n=8, max_tokens=24, temperature=1.0,
                           top_p=0.95, seed=1234)
        noise += [pool.submit(other, i) for i in range(6, 10)]
        served = mine.result()
        for f in noise:
            f.result()
    assert {c.index: c.text for c in served.choices} == offline


# ----------------------------------------------------------------------------------------------------------
# log-probs


def test_echo_logprobs_equal_an_fp64_forward_of_the_model(client, model, tok):
    ids = tok.encode(PROMPTS[1], bos=True)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref_model = load_model_double(model)
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(torch.tensor([ids]))[0].double(), -1)  # (L, V)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-4
        top = lp.top_logprobs[i]
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    # the generated token is the greedy one, with its log-prob
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))
    offsets = lp.text_offset
    assert offsets == sorted(offsets) and offsets[-1] <= len(r.choices[0].text)
    # max_tokens 0 with echo scores the prompt alone
    z = client.completions.create(model=NAME, prompt=ids, max_tokens=0, temperature=0, logprobs=3, echo=True)
    assert z.choices[0].text == tok.decode(ids) and z.usage.completion_tokens == 0
    assert z.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    # generated-token log-probs without echo: raw-distribution values of the sampled tokens
    g = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0.7, seed=1, logprobs=0)
    glp = g.choices[0].logprobs
    assert len(glp.tokens) == g.usage.completion_tokens and all(x <= 0 for x in glp.token_logprobs)


def load_model_double(model):
    import copy
    return copy.deepcopy(model).double()


# ----------------------------------------------------------------------------------------------------------
# tokenizer endpoints (open without the key, as in vLLM)


def test_tokenizer_endpoints_and_lm_evals_remote_tokenizer(server, tok):
    status, info = http("GET", server.url + "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    text = "Tom has 5 apples."
    assert http("POST", server.url + "/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"] == \
        tok.encode(text, bos=False)
    assert http("POST", server.url + "/tokenize", {"prompt": text})[1]["tokens"] == tok.encode(text, bos=True)
    assert http("POST", server.url + "/detokenize", {"tokens": tok.encode(text, bos=True)})[1]["prompt"] == text
    from lm_eval.utils import RemoteTokenizer

    remote = RemoteTokenizer(server.base_url + "/completions")  # lm-eval's own client of these endpoints
    assert remote.eos_token_id == tok.eos_id and remote.bos_token_id == tok.bos_id
    assert remote.encode(text) == tok.encode(text, bos=False) and remote.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------------------------------------
# bad input


BAD = [  # (path, body, status, param)
    ("/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ("/completions", {"model": NAME, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/completions", {"model": NAME, "prompt": "x " * 1100}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/completions", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/completions", {"model": NAME, "prompt": 5}, 400, None),
    ("/completions", {"model": NAME, "prompt": [1, "a"]}, 400, None),
    ("/completions", {"model": NAME, "prompt": [[]]}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("/completions", {"model": NAME}, 400, "prompt"),
    ("/completions", {"model": NAME, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/completions", {"model": NAME, "prompt": "x", "stop": 3}, 400, None),
    ("/completions", {"model": NAME, "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": "hello"}, 400, "messages"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": -1}, 400, "n"),
    ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


def _is_openai_error(body):
    return isinstance(body, dict) and set(body) == {"error"} and \
        set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_parameters_answer_4xx_with_an_openai_error_body(server, path, body, status, param):
    got, answer = http("POST", server.base_url + path, body, AUTH)
    assert got == status and _is_openai_error(answer), answer
    if param is not None:
        assert answer["error"]["param"] == param, answer


def test_malformed_json_unknown_routes_and_the_openai_clients_exceptions(server, client):
    for raw in (b"{not json", b"", b"[1, 2]", b'"prompt"'):
        got, answer = http("POST", server.base_url + "/completions", raw, AUTH)
        assert got == 400 and _is_openai_error(answer), (raw, answer)
    got, answer = http("GET", server.base_url + "/nothing", headers=AUTH)
    assert got == 404 and _is_openai_error(answer)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4-turbo", messages=[{"role": "user", "content": "x"}])


def test_api_key_guards_v1_only_with_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        got, answer = http("POST", server.base_url + "/completions", {"model": NAME, "prompt": "x"}, headers)
        assert got == 401 and _is_openai_error(answer)
        assert http("GET", server.base_url + "/models", headers=headers)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert http("GET", server.url + "/health")[0] == 200
    assert http("GET", server.url + "/metrics")[0] == 200
    assert http("POST", server.url + "/tokenize", {"prompt": "x"})[0] == 200


# ----------------------------------------------------------------------------------------------------------
# clients that leave


def test_a_client_that_leaves_mid_stream_or_while_waiting_is_aborted_and_its_slots_freed(server):
    before = server.metrics()
    body = {"model": NAME, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True, "temperature": 0.5,
            "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.base_url + "/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert server.metrics()["fastmath:slots_in_use"] >= 1
    # the connection is closed: the request is aborted and its slot freed long before its 1000 tokens
    wait_for(lambda: server.metrics()["fastmath:requests_aborted_total"] == before["fastmath:requests_aborted_total"] + 1,
             what="the abort")
    wait_for(lambda: server.metrics()["fastmath:slots_in_use"] == 0, what="free slots")
    m = server.metrics()
    assert m["fastmath:num_requests_running"] == 0
    assert m["fastmath:generation_tokens_total"] - before["fastmath:generation_tokens_total"] < 1000

    # not streamed: the client gives up while its request is decoding
    body.pop("stream")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, headers=AUTH, timeout=1.0)
    wait_for(lambda: server.metrics()["fastmath:requests_aborted_total"] == before["fastmath:requests_aborted_total"] + 2,
             what="the second abort")
    wait_for(lambda: server.metrics()["fastmath:slots_in_use"] == 0, what="free slots")


# ----------------------------------------------------------------------------------------------------------
# a full queue, then SIGTERM


def test_full_queue_answers_503_and_sigterm_finishes_in_flight_requests(ckpt):
    s = Server(ckpt, "--max-slots", "1", "--max-queue", "1", "--served-model-name", NAME)
    try:
        results = {}

        def stream_a():
            body = {"model": NAME, "prompt": "A", "max_tokens": 900, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=300) as r:
                results["a"] = [line for line in r.iter_lines() if line]

        def call_b():
            results["b"] = http("POST", s.base_url + "/completions",
                                {"model": NAME, "prompt": "B", "max_tokens": 5, "ignore_eos": True}, timeout=300)

        ta = threading.Thread(target=stream_a)
        ta.start()
        wait_for(lambda: s.metrics()["fastmath:num_requests_running"] == 1, what="A running")
        tb = threading.Thread(target=call_b)
        tb.start()
        wait_for(lambda: s.metrics()["fastmath:num_requests_waiting"] == 1, what="B waiting")
        status, body = http("POST", s.base_url + "/completions", {"model": NAME, "prompt": "C", "max_tokens": 5})
        assert status == 503 and _is_openai_error(body) and body["error"]["code"] == "queue_full"
        assert s.metrics()["fastmath:requests_rejected_total"] == 1
        assert s.metrics()["fastmath:num_requests_running"] == 1  # A was still decoding when SIGTERM came

        s.proc.send_signal(15)
        wait_for(lambda: _refused(s.url), timeout=20, what="the listening socket to close")
        ta.join(120)
        tb.join(120)
        s.proc.wait(60)
        assert s.proc.returncode in (0, -15), s.log()
        a = results["a"]
        assert a[-1] == "data: [DONE]" and '"finish_reason": "length"' in a[-2]
        assert results["b"][0] == 200 and results["b"][1]["usage"]["completion_tokens"] == 5
    finally:
        s.stop()


def _refused(url):
    try:
        http("GET", url + "/health", timeout=2)
        return False
    except OSError:
        return True
