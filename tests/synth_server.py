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
import email.parser
import email.policy
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
        self._lock = threading.RLock()  # batch handlers hold it while the fake model answers
        self._n = 0
        self._variants = Counter()
        # Batch API state: uploaded files, batches (oldest first) and the ledger tests check for double spending
        self.batch_behaviour = None  # (index of the create call, metadata, request lines) -> fault dict or None
        self.files, self.batches = {}, {}
        self.billed = []  # (batch id, custom_id, usage) of every output line the server billed
        self.create_calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                server._handle(self)

            def do_GET(self):
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
        raw = h.rfile.read(length) if length else b""
        path = h.path.split("?", 1)[0]
        if path.startswith("/v1/files") or path.startswith("/v1/batches"):
            return self._batch_api(h, raw)
        body = json.loads(raw or b"{}")
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
        reply = self._completion(body, f"chatcmpl-{n}", fault)
        entry["usage"] = reply["usage"]
        entry["id"] = reply["id"]
        self._send(h, entry, 200, reply)

    def _completion(self, body, completion_id, fault):
        """The chat.completion object the fake model answers to a request body (shared by sync and batch)."""
        content = body["messages"][-1]["content"]
        kind = "question" if "FINAL CREATED QUESTION" in content else "answer"
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
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage}

    # ---- Batch API ------------------------------------------------------------------------------------------
    # Faults from `batch_behaviour`: {"create_status": 429} (no batch made), {"fail": code} (the batch fails
    # validation with that error code, e.g. "token_limit_exceeded"), {"expire_after": k} (only k lines done,
    # then expired), {"error_ids": [...]} (those lines go to the error file), {"malformed_ids": [...]} (valid
    # JSON without a response body), {"garbage": k} (k unparseable lines appended, not billed).
    # A batch moves validating -> in_progress -> completed/expired/failed, one step per retrieve.
    def _batch_api(self, h, raw):
        entry = {"n": None, "kind": "batch_api", "path": h.path, "method": h.command, "start": time.time()}
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(h, entry, 401, {"error": {"message": "Incorrect API key provided.",
                                                        "type": "invalid_request_error", "code": "invalid_api_key"}})
        path, _, query = h.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        parts = path.strip("/").split("/")[1:]  # ["files"], ["files", id, "content"], ["batches", id], ...
        with self._lock:
            if parts == ["files"] and h.command == "POST":
                return self._upload(h, entry, raw)
            if parts == ["files"]:
                data = [f["meta"] for f in self.files.values()
                        if params.get("purpose") in (None, f["meta"]["purpose"])]
                return self._send(h, entry, 200, {"object": "list", "data": data, "has_more": False})
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and parts[1] in self.files:
                return self._send_raw(h, entry, self.files[parts[1]]["data"])
            if parts == ["batches"] and h.command == "POST":
                return self._create_batch(h, entry, json.loads(raw))
            if parts == ["batches"]:
                order = list(reversed(self.batches))  # newest first, as OpenAI lists them
                if "after" in params:
                    order = order[order.index(params["after"]) + 1:]
                page = order[:int(params.get("limit", 20))]
                data = [self._public(self.batches[b]) for b in page]
                return self._send(h, entry, 200, {"object": "list", "data": data, "has_more": len(order) > len(page),
                                                  "first_id": page[0] if page else None,
                                                  "last_id": page[-1] if page else None})
            if len(parts) == 2 and parts[0] == "batches" and parts[1] in self.batches:
                return self._send(h, entry, 200, self._public(self._advance(self.batches[parts[1]])))
        return self._send(h, entry, 404, {"error": {"message": f"no route {h.command} {path}",
                                                    "type": "invalid_request_error"}})

    def _upload(self, h, entry, raw):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + h.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
        fields = {}
        for part in msg.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = (
                part.get_filename(), part.get_payload(decode=True))
        name, data = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose != "batch":
            return self._send(h, entry, 400, {"error": {"message": f"purpose {purpose!r}", "param": "purpose"}})
        fid = f"file-{len(self.files)}"
        self.files[fid] = {"meta": {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                    "filename": name, "purpose": purpose, "status": "processed"}, "data": data}
        return self._send(h, entry, 200, self.files[fid]["meta"])

    def _new_file(self, name, lines):
        fid = f"file-{len(self.files)}"
        data = "".join(line + "\n" for line in lines).encode()
        self.files[fid] = {"meta": {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                    "filename": name, "purpose": "batch_output", "status": "processed"},
                           "data": data}
        return fid

    def _create_batch(self, h, entry, body):
        index = self.create_calls
        self.create_calls += 1
        data = self.files[body["input_file_id"]]["data"].decode()
        lines = [json.loads(x) for x in data.splitlines() if x.strip()]
        fault = (self.batch_behaviour(index, body.get("metadata") or {}, lines) if self.batch_behaviour else None) or {}
        if "create_status" in fault:
            return self._send(h, entry, fault["create_status"], {"error": {"message": "injected", "code": None}},
                              {"Retry-After": "0"})
        assert len(lines) <= 50_000 and len(data) <= 200 * 2**20, "over the Batch API's file limits"
        assert body["endpoint"] == "/v1/chat/completions" and body["completion_window"] == "24h"
        bid = f"batch_{len(self.batches)}"
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                             "input_file_id": body["input_file_id"], "completion_window": "24h",
                             "status": "validating", "output_file_id": None, "error_file_id": None,
                             "created_at": int(time.time()), "metadata": body.get("metadata"),
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                             "_lines": lines, "_fault": fault}
        return self._send(h, entry, 200, self._public(self.batches[bid]))

    @staticmethod
    def _public(batch):
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, b):
        fault = b["_fault"]
        if b["status"] == "validating":
            if "fail" in fault:
                b["status"] = "failed"
                b["errors"] = {"object": "list", "data": [{"code": fault["fail"], "line": None, "param": None,
                                                           "message": f"injected {fault['fail']}"}]}
            else:
                b["status"] = "in_progress"
        elif b["status"] == "in_progress":
            out, err = [], []
            lines = b["_lines"][:fault.get("expire_after", len(b["_lines"]))]
            for i, line in enumerate(lines):
                cid = line["custom_id"]
                if cid in fault.get("error_ids", ()):
                    err.append(json.dumps({"id": f"batch_req_{b['id']}_{i}", "custom_id": cid, "response": {
                        "status_code": 400, "request_id": f"req_{i}",
                        "body": {"error": {"message": "injected bad request", "type": "invalid_request_error"}}},
                        "error": None}))
                    continue
                reply = self._completion(line["body"], f"chatcmpl-{b['id']}-{i}", {})
                self.billed.append((b["id"], cid, reply["usage"]))
                response = {"status_code": 200, "request_id": f"req_{i}", "body": reply}
                if cid in fault.get("malformed_ids", ()):
                    response = {"status_code": 200, "request_id": f"req_{i}",
                                "body": {"id": reply["id"], "usage": reply["usage"]}}  # no choices
                out.append(json.dumps({"id": f"batch_req_{b['id']}_{i}", "custom_id": cid, "response": response,
                                       "error": None}))
            out.extend("{truncated garbage" for _ in range(fault.get("garbage", 0)))
            b["output_file_id"] = self._new_file(f"{b['id']}_output.jsonl", out) if out else None
            b["error_file_id"] = self._new_file(f"{b['id']}_error.jsonl", err) if err else None
            b["request_counts"] = {"total": len(b["_lines"]), "completed": len(lines) - len(err), "failed": len(err)}
            b["status"] = "expired" if "expire_after" in fault else "completed"
        return b

    def _send_raw(self, h, entry, data):
        entry["status"] = 200
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        entry["end"] = time.time()
        self.log.append(entry)

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
        self.log.append(entry)  # list.append is atomic; batch handlers already hold the lock
