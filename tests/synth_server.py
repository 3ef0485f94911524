"""A small OpenAI chat-completions server for the synth tests.

Binds 127.0.0.1 only, answers at most `max_requests` requests (then 503) and shuts itself down after
`lifetime` seconds. It follows the fastmath prompts the way a model would: a question request
(the prompt asks for "FINAL CREATED QUESTION") gets a three-field reply whose final question is made
from a hash of the seed text, with two numbers a and b and made-up words (so distinct seeds give
questions that share no word 3-grams); an answer request gets steps ending "FINAL ANSWER: a+b".

`behaviour(n, kind, key)` (n = 0-based request number, key = sha256 of the user message) may return
a fault: {"status": 429, "retry_after": "1"}, {"status": 500}, {"status": 401}, {"sleep": seconds},
{"content": "raw text"} or {"answer": value}. Every request is logged with its times and outcome.
"""
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _word(rng):
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def created_question(seed_text, variant=0):
    """The final question the server creates from a seed the `variant`-th time it is asked (0-based);
    tests use it as an independent reference."""
    rng = random.Random(hashlib.sha256(f"{variant}:{seed_text}".encode()).hexdigest())
    name = _word(rng).capitalize()
    w = [_word(rng) for _ in range(8)]
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    return (f"{name} keeps {a} {w[0]} {w[1]} in a {w[2]} and later finds {b} more near the {w[3]} {w[4]}. "
            f"{w[5].capitalize()} {w[6]} {w[7]}. How many {w[0]} {w[1]} does {name} keep altogether?")


def question_numbers(question):
    """(a, b) of a created question."""
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    return a, b


class FakeOpenAI:
    """Context manager running the server in a thread; `url` is the base URL, `log` the request log."""

    def __init__(self, api_key="test-key", behaviour=None, delay=0.0, max_requests=400, lifetime=90.0):
        self.api_key, self.behaviour, self.delay = api_key, behaviour, delay
        self.max_requests, self.lifetime = max_requests, lifetime
        self.log = []
        self._lock = threading.Lock()
        self._n = 0
        self._variants = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self._httpd.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait_for(self, n_logged, timeout=5.0):
        """Wait until `n_logged` requests have been logged (slow handlers log when they finish)."""
        deadline = time.time() + timeout
        while len(self.log) < n_logged and time.time() < deadline:
            time.sleep(0.02)

    # ---- request handling -----------------------------------------------------------------------------------
    def _handle(self, h):
        t_start = time.time()
        length = int(h.headers.get("Content-Length", 0))
        body = json.loads(h.rfile.read(length) or b"{}")
        with self._lock:
            n = self._n
            self._n += 1
        content = body["messages"][-1]["content"]
        kind = "question" if "FINAL CREATED QUESTION" in content else "answer"
        key = hashlib.sha256(content.encode()).hexdigest()
        entry = {"n": n, "kind": kind, "key": key, "start": t_start, "model": body.get("model"),
                 "temperature": body.get("temperature")}
        if h.path != "/v1/chat/completions":
            return self._send(h, entry, 404, {"error": {"message": f"no route {h.path}", "type": "invalid_request"}})
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(h, entry, 401, {"error": {"message": "Incorrect API key provided.",
                                                        "type": "invalid_request_error", "code": "invalid_api_key"}})
        if n >= self.max_requests:
            return self._send(h, entry, 503, {"error": {"message": "request budget of the test server spent"}})
        fault = (self.behaviour(n, kind, key) if self.behaviour else None) or {}
        if "status" in fault:
            headers = {"Retry-After": fault["retry_after"]} if "retry_after" in fault else {}
            return self._send(h, entry, fault["status"], {"error": {"message": f"injected {fault['status']}"}},
                              headers)
        time.sleep(fault.get("sleep", self.delay))
        if "content" in fault:
            text = fault["content"]
        elif kind == "question":
            seed = content.split("Seed problem:\n", 1)[1]
            with self._lock:  # a seed asked again (another item) gets a new question, as from a real model
                variant = self._variants[seed]
                self._variants[seed] += 1
            q = created_question(seed, variant)
            text = (f"CREATED QUESTION: {q}\nVERIFICATION AND MODIFICATION: The problem is solvable; "
                    f"no change needed.\nFINAL CREATED QUESTION: {q}")
        else:
            question = content.split("Problem:\n", 1)[1]
            a, b = question_numbers(question)
            c = fault.get("answer", a + b)
            text = (f"First count what is kept: {a}.\nThen add what is found: {a} + {b} = {c}.\n"
                    f"FINAL ANSWER: {c}\nThe answer is: {c}")
        usage = {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        reply = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                 "model": body.get("model"),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": usage}
        entry["usage"] = usage
        entry["id"] = reply["id"]
        self._send(h, entry, 200, reply)

    def _send(self, h, entry, status, payload, headers=None):
        data = json.dumps(payload).encode()
        entry["status"] = status
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
            entry["delivered"] = True
        except (BrokenPipeError, ConnectionResetError):
            entry["delivered"] = False  # the client gave up (timeout) or was killed
        entry["end"] = time.time()
        with self._lock:
            self.log.append(entry)
