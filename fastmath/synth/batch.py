"""`fastmath synth --batch`: the two synthesis calls as rounds of OpenAI Batch API jobs (half the price, <= 24 h).

A *submission* is one request file of one stage ("question" = create+verify, "answer" = solve) in one round.
Its life, each step journaled (fsynced) the moment it exists, so a kill anywhere resumes without paying twice:

    submit    {"type": "submit", sub, round, stage, part, name, ids, est_cost}   the custom_ids are now "live"
    file      {"type": "file", sub, file_id}            after files.create(purpose="batch")
    batch     {"type": "batch", sub, batch_id, attempt} after batches.create (24h, /v1/chat/completions)
    replies   one reply entry per output/error line (written with ONE fsync per downloaded file)
    collected {"type": "collected", sub, batch_id, status, counts}   the submission is closed

A rerun replays the journal: live submissions resume where they stopped. A request file without a journaled
file id is rendered again (byte for byte) and an uploaded file of that name and size is adopted; a file
without a journaled batch id first lists the account's batches and adopts one whose metadata names this run,
submission and attempt (a kill between `batches.create` returning and the journal write must not pay twice).
Replies already journaled for a live submission are skipped when its files are downloaded again.

custom_id = "i{item}-{q|a}{slot}-r{attempt}": attempt counts the item's rejected replies for that call, so a
retry after an unparseable reply is a new request and a stale reply (same item, older attempt) is ignored.
A request is submitted again only when its submission is closed without a usable reply (expired or
cancelled batch: the completed lines are kept and billed; failed validation; error-file line).
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

MAX_REQUESTS_PER_FILE = 50_000  # the Batch API's limits per input file
MAX_BYTES_PER_FILE = 200 * 2**20
BATCH_ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "cancelled", "failed")
# Completion tokens assumed per request before any reply of that stage was seen (reservation under --max-cost).
COMPLETION_PRIOR = {"question": 600, "answer": 500}
CHARS_PER_TOKEN = 4  # prompt token estimate: characters / 4 (OpenAI's rule of thumb for English)


def kill_point(name):
    """Tests: SIGKILL this process at a named point when FASTMATH_TEST_KILL_AT names it (an honest crash)."""
    if os.environ.get("FASTMATH_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def custom_id(item, kind, slot, attempt):
    return f"i{item}-{kind[0]}{slot}-r{attempt}"


def parse_custom_id(cid):
    """(item, kind, slot, attempt) of a custom_id made by `custom_id`, or None."""
    try:
        i, ks, r = cid.split("-")
        kind = {"q": "question", "a": "answer"}[ks[0]]
        if i[0] != "i" or r[0] != "r":
            return None
        return int(i[1:]), kind, int(ks[1:]), int(r[1:])
    except (AttributeError, ValueError, KeyError, IndexError):
        return None


def estimate_tokens(messages):
    """Prompt tokens of chat messages by characters / 4 (+4 per message for the chat framing)."""
    return sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + 4 for m in messages)


@dataclass
class Submission:
    sid: int
    round: int
    stage: str
    part: int
    name: str
    ids: list
    est_cost: float
    time: float
    file_id: str | None = None
    batch_id: str | None = None
    attempt: int = 0  # batches made for this file (a new one after token_limit_exceeded)
    received: set = field(default_factory=set)  # custom_ids already journaled from this submission's files
    not_before: float = 0.0  # token_limit_exceeded: no new batch before this time
    last: dict | None = None  # last status seen (progress line only)


class Submissions:
    """The journal's view of request files and batches; `on_journal` is the only place it changes."""

    def __init__(self):
        self.live = {}  # sid -> Submission (not yet collected)
        self.next_sid = 0
        self.round = 0
        self.closed = 0
        self.batches_made = 0
        self.failed_validation = 0  # consecutive failed batches (reset by a completed one)

    def on_journal(self, e):
        t = e["type"]
        if t == "submit":
            self.live[e["sub"]] = Submission(e["sub"], e["round"], e["stage"], e["part"], e["name"], e["ids"],
                                             e["est_cost"], e["time"])
            self.next_sid = max(self.next_sid, e["sub"] + 1)
            self.round = max(self.round, e["round"])
            return
        sub = self.live.get(e["sub"])
        if sub is None:
            return
        if t == "file":
            sub.file_id = e["file_id"]
        elif t == "batch":
            sub.batch_id, sub.attempt = e["batch_id"], e["attempt"] + 1
            self.batches_made += 1
        elif t == "batch_failed":
            sub.batch_id = None
            if e["retry"]:  # token_limit_exceeded: the same file goes again later
                sub.not_before = e["retry_at"]
            else:
                self.failed_validation += 1
                del self.live[e["sub"]]
                self.closed += 1
        elif t == "collected":
            if e["status"] == "completed":
                self.failed_validation = 0
            del self.live[e["sub"]]
            self.closed += 1

    def on_reply(self, e):
        sub = self.live.get(e.get("sub"))
        if sub is not None:
            sub.received.add(e["custom_id"])

    def live_ids(self):
        return {cid for sub in self.live.values() for cid in sub.ids if cid not in sub.received}

    def reserved(self):
        return sum(sub.est_cost for sub in self.live.values())


class BatchAPI:
    """Files and batches through the official synchronous `openai` client, with the chat client's retry rules
    (429 with Retry-After, 5xx, timeouts, connection errors) and one-sentence fatal errors."""

    def __init__(self, api_key, base_url, policy, timeout=120.0):
        import openai

        from .client import DEFAULT_BASE_URL, ChatClient

        self.base_url = base_url or DEFAULT_BASE_URL
        self.policy = policy
        self._client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout)
        # borrowed for its error classification only (no request is sent through it)
        self._classifier = ChatClient(api_key, self.base_url, "batch", timeout=timeout, policy=policy)
        self.retries = 0

    def close(self):
        self._client.close()

    def _call(self, fn, *args, **kwargs):
        from .client import FatalAPIError

        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # classified below; unknown errors propagate
                retry_after, reason = self._classifier._classify(e)
            if attempt >= self.policy.max_retries:
                raise FatalAPIError(f"The Batch API at {self.base_url} kept failing ({reason}) after {attempt} "
                                    "retries; rerun the same command later to resume.") from None
            time.sleep(self.policy.delay(attempt, retry_after))
            attempt += 1
            self.retries += 1

    def find_file(self, name, size):
        """Id of an uploaded batch file with this name and size (a kill after upload, before the journal)."""
        for f in self._call(self._client.files.list, purpose="batch"):
            if f.filename == name and f.bytes == size:
                return f.id
        return None

    def upload(self, name, data):
        return self._call(self._client.files.create, file=(name, data, "application/jsonl"), purpose="batch").id

    def find_batch(self, metadata, since):
        """A batch whose metadata holds every pair of `metadata`, created at or after `since` - 600 s (newest
        first, so the listing stops at older batches)."""
        page = self._call(self._client.batches.list, limit=100)
        while True:
            for b in page.data:
                if b.created_at is not None and b.created_at < since - 600:
                    return None
                if all((b.metadata or {}).get(k) == v for k, v in metadata.items()):
                    return b
            if not page.has_more or not page.data:
                return None
            page = self._call(self._client.batches.list, limit=100, after=page.data[-1].id)

    def create(self, file_id, metadata):
        return self._call(self._client.batches.create, input_file_id=file_id, endpoint=BATCH_ENDPOINT,
                          completion_window="24h", metadata=metadata)

    def retrieve(self, batch_id):
        return self._call(self._client.batches.retrieve, batch_id)

    def content(self, file_id):
        return self._call(self._client.files.content, file_id).read()


def render_line(cid, messages, cfg):
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}
    if cfg.max_tokens is not None:
        body["max_tokens"] = cfg.max_tokens
    return json.dumps({"custom_id": cid, "method": "POST", "url": BATCH_ENDPOINT, "body": body},
                      ensure_ascii=False) + "\n"


def parse_output_line(line, sub, cfg):
    """One line of an output or error file -> a journal entry: a reply, an error reply (no usable text), or a
    malformed line (custom_id unknown). Returns (entry, custom_id or None)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"type": "malformed", "sub": sub.sid, "reason": "output line is not valid JSON", "text": line[:2000]}, None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    parsed = parse_custom_id(cid) if isinstance(cid, str) else None
    if parsed is None or cid not in sub.ids:
        return {"type": "malformed", "sub": sub.sid, "reason": f"unknown custom_id {cid!r}",
                "text": line[:2000]}, None
    item, kind, slot, attempt = parsed
    entry = {"item": item, "kind": kind, "slot": slot, "attempt": attempt, "custom_id": cid, "sub": sub.sid,
             "text": "", "prompt_tokens": 0, "completion_tokens": 0, "model": cfg.model, "finish_reason": None,
             "id": None}
    response = obj.get("response") if isinstance(obj.get("response"), dict) else {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    entry["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)  # billed even when the reply is unusable
    entry["completion_tokens"] = int(usage.get("completion_tokens") or 0)
    if obj.get("error"):
        err = obj["error"]
        entry["error"] = f"batch error: {err.get('code') if isinstance(err, dict) else err}: " \
                         f"{err.get('message') if isinstance(err, dict) else ''}".strip()
        return entry, cid
    status = response.get("status_code")
    if status != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
        entry["error"] = f"batch error: HTTP {status}: {message or 'no message'}"
        return entry, cid
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance((choices[0].get("message") or {}).get("content"), str):
        entry["error"] = "malformed output line: no choices[0].message.content"
        return entry, cid
    entry.update(text=choices[0]["message"]["content"], model=body.get("model") or cfg.model,
                 finish_reason=choices[0].get("finish_reason"), id=body.get("id"))
    return entry, cid


class BatchRunner:
    """The submit / poll / collect loop over a replayed `SynthState` and `Submissions`."""

    def __init__(self, state, subs, journal, api, cfg, price, header, apply, out=None, checkpoint=None):
        self.state, self.subs, self.journal, self.api = state, subs, journal, api
        self.checkpoint = checkpoint  # writes the state snapshot (after each collection)
        self.cfg, self.price, self.header, self.apply, self.out = cfg, price, header, apply, out
        self.batches_created = 0  # this session
        self.max_requests = min(cfg.batch_size, MAX_REQUESTS_PER_FILE)

    # ---- journal ----------------------------------------------------------------------------------------------
    def _log(self, entry):
        self.journal.append(entry)
        self.subs.on_journal(entry)

    def _metadata(self, sub):
        # string values only (Batch API metadata); names the run, its arguments, the stage, round and file
        return {"fastmath_run": self.header["run_id"], "fastmath_fingerprint": self.header["fingerprint"][:32],
                "stage": sub.stage, "round": str(sub.round), "file": sub.name, "attempt": str(sub.attempt)}

    # ---- cost -------------------------------------------------------------------------------------------------
    def spent(self):
        u = self.state.usage
        return (u["prompt_tokens"] * self.price[0] + u["completion_tokens"] * self.price[1]) / 1e6

    def request_cost(self, kind, messages):
        """Estimated cost of one request: prompt chars/4; completion = --max-tokens, else 1.25 x the mean of
        this stage's replies so far, else a prior."""
        if self.price is None:
            return 0.0
        completion = self.cfg.max_tokens
        if completion is None:
            n, tokens = self.state.kind_usage.get(kind, (0, 0))
            completion = 1.25 * tokens / n if n else COMPLETION_PRIOR[kind]
        return (estimate_tokens(messages) * self.price[0] + completion * self.price[1]) / 1e6

    # ---- submitting -------------------------------------------------------------------------------------------
    def submit_pending(self):
        """Submit every request the state still needs that no live submission holds, within --max-cost.
        Returns (number submitted, whether the budget held some back)."""
        live = self.subs.live_ids()
        budget = None
        if self.cfg.max_cost is not None:
            budget = self.cfg.max_cost - self.spent() - self.subs.reserved()
        chosen = {"question": [], "answer": []}  # (custom_id, line bytes, est cost); lines are rendered again
        # at upload, so a million requests never sit in memory as text
        held_back = False
        for item_id, kind, slot, attempt in self.state.batch_requests(live, lambda: budget is None or budget > 0):
            messages = self.state.messages((item_id, kind, slot))
            cost = self.request_cost(kind, messages)
            if budget is not None:
                if cost > budget:
                    held_back = True
                    self.state.discard_unsent(item_id)
                    break
                budget -= cost
            cid = custom_id(item_id, kind, slot, attempt)
            chosen[kind].append((cid, len(render_line(cid, messages, self.cfg).encode()), cost))
        n = 0
        if chosen["question"] or chosen["answer"]:
            round_no = self.subs.round + 1
            for stage in ("question", "answer"):
                for part, chunk in enumerate(self._split(chosen[stage])):
                    sid = self.subs.next_sid
                    name = f"fastmath-{self.header['run_id']}-r{round_no}-{stage}-{part}-s{sid}.jsonl"
                    self._log({"type": "submit", "sub": sid, "round": round_no, "stage": stage, "part": part,
                               "name": name, "ids": [c[0] for c in chunk], "est_cost": sum(c[2] for c in chunk),
                               "time": round(time.time(), 3)})
                    n += len(chunk)
        return n, held_back

    def _split(self, requests):
        """Chunks of at most max_requests lines and MAX_BYTES_PER_FILE bytes."""
        chunk, size = [], 0
        for r in requests:
            b = r[1]
            if chunk and (len(chunk) >= self.max_requests or size + b > MAX_BYTES_PER_FILE):
                yield chunk
                chunk, size = [], 0
            chunk.append(r)
            size += b
        if chunk:
            yield chunk

    def render(self, sub):
        """The request file of a submission, byte for byte as first rendered."""
        lines = []
        for cid in sub.ids:
            item_id, kind, slot, _ = parse_custom_id(cid)
            lines.append(render_line(cid, self.state.messages((item_id, kind, slot)), self.cfg))
        return "".join(lines).encode()

    # ---- advancing one submission -----------------------------------------------------------------------------
    def advance(self, sub):
        """One step for a live submission: upload, create (or adopt), poll, collect. Never blocks on the batch."""
        from .client import FatalAPIError

        if sub.file_id is None:
            data = self.render(sub)
            file_id = self.api.find_file(sub.name, len(data)) or self.api.upload(sub.name, data)
            kill_point("after_upload")
            self._log({"type": "file", "sub": sub.sid, "file_id": file_id})
        if sub.batch_id is None:
            if time.time() < sub.not_before:
                return
            meta = self._metadata(sub)
            batch = self.api.find_batch(meta, sub.time)
            if batch is None:
                batch = self.api.create(sub.file_id, meta)
                self.batches_created += 1
            kill_point("after_create")
            self._log({"type": "batch", "sub": sub.sid, "batch_id": batch.id, "attempt": sub.attempt})
        batch = self.api.retrieve(sub.batch_id)
        sub.last = {"status": batch.status, **(batch.request_counts.model_dump() if batch.request_counts else {})}
        if batch.status not in TERMINAL:
            kill_point("while_polling")
            return
        if batch.status == "failed":
            errors = (batch.errors.data if batch.errors is not None and batch.errors.data else [])
            code = errors[0].code if errors else None
            message = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
            retry = code == "token_limit_exceeded"  # enqueued-token limit: wait for other batches, then retry
            if retry and sub.attempt > self.cfg.max_retries:
                raise FatalAPIError(f"Batch {batch.id} kept failing with token_limit_exceeded after {sub.attempt} "
                                    "tries; rerun the same command later to resume.")
            self._log({"type": "batch_failed", "sub": sub.sid, "batch_id": batch.id, "code": code,
                       "message": message, "retry": retry,
                       "retry_at": round(time.time() + max(self.cfg.poll_interval, 1.0 if self.cfg.poll_interval >= 1
                                                           else self.cfg.poll_interval), 3)})
            if not retry and self.subs.failed_validation >= 2:
                raise FatalAPIError(f"Batch {batch.id} failed validation ({message}); two batches in a row failed, "
                                    "so nothing more is submitted.")
            return
        self.collect(sub, batch)

    def collect(self, sub, batch):
        """Download the output and error files of a finished batch, journal their lines (one fsync per file),
        apply them, then close the submission. Lines already journaled (an earlier, killed collect) are skipped."""
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            text = self.api.content(file_id).decode("utf-8", errors="replace")
            kill_point("download")
            entries = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                entry, cid = parse_output_line(line, sub, self.cfg)
                if cid is not None:
                    if cid in sub.received:
                        continue
                    sub.received.add(cid)
                entries.append(entry)
            self.journal.append_many(entries)  # on disk before any of it is applied
            self.state.prepare_dedup(entries)
            for entry in entries:
                self.apply(entry)
            kill_point("after_download")
        counts = batch.request_counts.model_dump() if batch.request_counts else {}
        self._log({"type": "collected", "sub": sub.sid, "batch_id": batch.id, "status": batch.status,
                   "counts": counts, "time": round(time.time(), 3)})

    # ---- the loop ---------------------------------------------------------------------------------------------
    def progress(self):
        parts = []
        for sub in self.subs.live.values():
            last = sub.last or {}
            parts.append(f"{sub.batch_id or sub.name} {sub.stage} {last.get('completed', 0)}/{last.get('failed', 0)}/"
                         f"{last.get('total', len(sub.ids))} {last.get('status', 'pending')}")
        spend = f"${self.spent():.4f} spent, ${self.subs.reserved():.4f} reserved" if self.price else ""
        print(f"[synth --batch] round {self.subs.round}: kept {self.state.kept}/{self.state.n_target}; {spend}; "
              f"batches (completed/failed/total): " + ("; ".join(parts) or "none"), file=self.out or sys.stderr,
              flush=True)

    def run(self):
        """Returns the stop reason: None (done), "submitted" (--no-wait), "max_cost" or "max_items"."""
        while True:
            closed = self.subs.closed
            for sub in list(self.subs.live.values()):
                self.advance(sub)
            if self.subs.closed != closed and self.checkpoint is not None:
                self.checkpoint()  # a rerun replays only what comes after this
            held_back = False
            if not self.state.done():
                _, held_back = self.submit_pending()
                for sub in list(self.subs.live.values()):
                    if sub.batch_id is None:
                        self.advance(sub)  # upload and create the new ones now
            if not self.subs.live:
                if self.state.done():
                    return None if self.state.kept >= self.state.n_target else "max_items"
                return "max_cost" if held_back else "max_items"
            if self.cfg.progress:
                self.progress()
            if not self.cfg.wait and all(s.batch_id is not None for s in self.subs.live.values()):
                return "submitted"
            time.sleep(self.cfg.poll_interval)
