"""The synthesis run: item plan, journal, resume, dedup/decontamination, consistency vote, cost.

Files, for `--out data/synth.jsonl`:
    data/synth.jsonl          kept records: question, solution, answer, seed_id, model, usage (+ style, item)
    data/synth.journal.jsonl  a header (argument fingerprint) then every raw reply, appended and fsynced
                              BEFORE it is parsed; the single source of truth for resume
    data/synth.rejects.jsonl  replies that could not be parsed, with the reason
    data/synth.report.json    counts (kept, dropped by reason, rejects, consistency), usage and cost

Item i of the plan uses seed `plan.seed_index(i)` (a fixed shuffle of the seeds per epoch, from `--seed`).
An item is: one question call (retried while unparseable, up to a limit), a duplicate/contamination check
of the question, k answer calls, a majority vote when k > 1, then one record. Dropped items are replaced
by the next items of the plan until `num_questions` records are kept (or `max_items` items were tried).

Resume: the journal is replayed through the same code path as live replies (`SynthState.on_reply`), so
the records, rejects and every decision are rebuilt exactly; only requests in flight at a crash are sent
again. Records and rejects are rewritten from the replay, then appended to live.
"""
import asyncio
import hashlib
import json
import os
import pickle
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from . import prompts
from ..fsio import AppendFile, StorageError, atomic_open, atomic_write_json, write_failed
from .dedup import ContaminationIndex, MinHashLSHIndex, NearDupIndex
from .parse import ParseError, load_problems, normalise_answer, parse_answer_reply, parse_question_reply

JOURNAL_VERSION = 1

BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price
# USD per million tokens (input, output); the longest matching prefix of the model name wins.
PRICES = {
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}


class SynthError(ValueError):
    """A user-facing problem (bad input file, mismatched resume, unusable endpoint): one clear sentence."""


def model_price(model, price_in=None, price_out=None):
    """(input, output) USD per million tokens for `model`, overrides applied; None when unknown."""
    match = max((k for k in PRICES if model.startswith(k)), key=len, default=None)
    base = PRICES.get(match)
    if price_in is None and price_out is None:
        return base
    if base is None and (price_in is None or price_out is None):
        return None
    return (price_in if price_in is not None else base[0], price_out if price_out is not None else base[1])


@dataclass
class SynthConfig:
    """Every setting of a run; see `fastmath synth --help` for the meaning of each."""
    seeds: Path
    out: Path
    num_questions: int | None = None
    per_seed: int | None = None
    model: str = "gpt-4-turbo"
    base_url: str | None = None
    concurrency: int = 16
    style: str = "auto"
    consistency: int = 1
    decontaminate: tuple = ()
    max_cost: float | None = None
    seed: int = 0
    timeout: float = 120.0
    max_retries: int = 8
    retry_base_delay: float = 1.0
    temperature: float = 1.0
    max_tokens: int | None = None
    price_in: float | None = None
    price_out: float | None = None
    max_parse_retries: int = 3
    dedup_ngram: int = 3
    dedup_threshold: float = 0.7
    decontam_ngram: int = 10
    max_items: int | None = None
    progress: bool = True
    batch: bool = False  # the OpenAI Batch API instead of synchronous calls
    wait: bool = True  # batch: poll until done (False: submit, journal and exit; a rerun collects)
    poll_interval: float = 60.0
    batch_size: int = 50_000  # requests per batch file (the API allows at most 50,000)
    dedup: str = "minhash"  # near-duplicate index: "minhash" (bounded memory) or "exact" (prefix filtering)


def output_paths(out):
    """dict name -> Path of the files written beside `out` (records, journal, rejects, report)."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {
        "records": out,
        "journal": out.with_name(stem + ".journal.jsonl"),
        "rejects": out.with_name(stem + ".rejects.jsonl"),
        "report": out.with_name(stem + ".report.json"),
        "snapshot": out.with_name(stem + ".snapshot.pkl"),
    }


class ItemPlan:
    """Deterministic seed choice: item i uses seed perm_e[i % n] with e = i // n, where perm_e is a shuffle of
    range(n) seeded by (seed, e). Every block of n consecutive items uses every seed once."""

    def __init__(self, n_seeds, seed):
        self.n, self.seed = n_seeds, seed
        self._perms = {}

    def seed_index(self, item):
        epoch, pos = divmod(item, self.n)
        if epoch not in self._perms:
            self._perms[epoch] = random.Random(f"fastmath-synth:{self.seed}:{epoch}").sample(range(self.n), self.n)
        return self._perms[epoch][pos]


@dataclass
class Item:
    id: int
    seed: int  # index into the seed list
    style: str
    k: int
    question: str | None = None
    question_rejects: int = 0
    answers: list = field(default_factory=list)  # per slot: None or (solution, answer, model)
    answer_rejects: list = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def __post_init__(self):
        self.answers = [None] * self.k
        self.answer_rejects = [0] * self.k


def _load_equiv():
    """fastmath.grading.is_equiv when that module exists, else None (exact match of normalised answers)."""
    try:
        from fastmath.grading import is_equiv
    except (ImportError, AttributeError):
        return None
    return is_equiv


class SynthState:
    """Item bookkeeping shared by live replies and journal replay.

    `on_reply(entry)` is the only place a reply changes the state, so replaying the journal in order
    reproduces every decision of the original run.
    """

    def __init__(self, cfg, seeds, n_target, max_items, near, contam, sink, equiv):
        self.cfg, self.seeds, self.n_target, self.max_items = cfg, seeds, n_target, max_items
        self.plan = ItemPlan(len(seeds), cfg.seed)
        self.near, self.contam, self.sink, self.equiv = near, contam, sink, equiv
        self.active = {}  # item id -> Item (issued, not finished)
        self.finished = set()  # ids kept or dropped
        self.queue = deque()  # pending requests (item id, kind, slot) of active items
        self.next_id = 0
        self.kept = 0
        self.dropped = Counter()
        self.contaminated_by = Counter()
        self.rejected = Counter()
        self.voted = 0
        self.usage = Counter()
        self.kind_usage = {}  # kind -> (replies with usage, completion tokens): the batch cost estimate

    _EXTERNAL = ("cfg", "seeds", "contam", "sink", "equiv")  # reattached by `attach` after a snapshot load

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._EXTERNAL}

    def attach(self, cfg, seeds, contam, sink, equiv):
        self.cfg, self.seeds, self.contam, self.sink, self.equiv = cfg, seeds, contam, sink, equiv

    # ---- issuing ----------------------------------------------------------------------------------------------
    def _item(self, item_id):
        item = self.active.get(item_id)
        if item is None:
            seed = self.plan.seed_index(item_id)
            style = self.cfg.style if self.cfg.style != "auto" else self.seeds[seed].style
            item = self.active[item_id] = Item(item_id, seed, style, self.cfg.consistency)
            self.next_id = max(self.next_id, item_id + 1)
        return item

    def can_issue(self):
        return self.kept + len(self.active) < self.n_target and self.next_id < self.max_items

    def next_request(self):
        """The next request to send: a pending follow-up, else the first question of a new item, else None."""
        if self.queue:
            return self.queue.popleft()
        if self.can_issue():
            return (self._item(self.next_id).id, "question", 0)
        return None

    def rebuild_queue(self):
        """After replay: every issued, unfinished item needs its missing requests (lost in flight at the crash)."""
        for item_id in range(self.next_id):
            if item_id not in self.finished:
                self._item(item_id)
        self.queue.clear()
        for item_id in sorted(self.active):
            item = self.active[item_id]
            if item.question is None:
                self.queue.append((item_id, "question", 0))
            else:
                self.queue.extend((item_id, "answer", s) for s, a in enumerate(item.answers) if a is None)

    def batch_requests(self, exclude, allow_new):
        """Batch mode: (item, kind, slot, attempt) of every request the state needs that is not in `exclude`
        (custom_ids of live submissions): answers of active items first (their questions are paid for), then
        question retries, then the questions of new items while `allow_new()` and `can_issue()`."""
        from .batch import custom_id

        for item_id in sorted(self.active):
            item = self.active[item_id]
            if item.question is not None:
                for s, a in enumerate(item.answers):
                    if a is None and custom_id(item_id, "answer", s, item.answer_rejects[s]) not in exclude:
                        yield item_id, "answer", s, item.answer_rejects[s]
        for item_id in sorted(self.active):
            item = self.active[item_id]
            if item.question is None and custom_id(item_id, "question", 0, item.question_rejects) not in exclude:
                yield item_id, "question", 0, item.question_rejects
        while allow_new() and self.can_issue():
            yield self._item(self.next_id).id, "question", 0, 0

    def prepare_dedup(self, entries):
        """Hash the questions of many replies at once (a downloaded batch file) for the contamination and
        near-duplicate indexes; their answers are unchanged, only computed in fewer numpy calls."""
        texts = []
        for e in entries:
            if e.get("kind") == "question" and not e.get("error"):
                try:
                    texts.append(parse_question_reply(e["text"]))
                except ParseError:
                    pass
        if self.contam is not None:
            self.contam.prepare(texts)
        if hasattr(self.near, "prepare"):
            self.near.prepare(texts)

    def discard_unsent(self, item_id):
        """Forget an item created for a request that was then not submitted (over the budget), so the item ids
        of a run do not depend on where a budget stopped it."""
        item = self.active.get(item_id)
        if item is not None and item.requests == 0 and item.question is None and item_id == self.next_id - 1:
            del self.active[item_id]
            self.next_id -= 1

    def messages(self, request):
        item_id, kind, _ = request
        item = self.active[item_id]
        if kind == "question":
            return prompts.question_messages(self.seeds[item.seed].question, item.style)
        return prompts.answer_messages(item.question, item.style)

    def done(self):
        return self.kept >= self.n_target or (not self.active and not self.can_issue())

    # ---- replies ----------------------------------------------------------------------------------------------
    def on_reply(self, entry):
        """Apply one journaled reply: parse, check, vote, write a record or a reject, queue follow-ups."""
        item_id, kind, slot = entry["item"], entry["kind"], entry["slot"]
        self.usage["prompt_tokens"] += entry["prompt_tokens"]
        self.usage["completion_tokens"] += entry["completion_tokens"]
        self.usage["requests"] += 1
        if not entry.get("error"):
            n, tokens = self.kind_usage.get(kind, (0, 0))
            self.kind_usage[kind] = (n + 1, tokens + entry["completion_tokens"])
        if item_id in self.finished:
            return  # a reply for an item already finished (cannot happen in a consistent journal)
        item = self._item(item_id)
        attempt = entry.get("attempt")  # batch replies name the attempt they answer; an older one is stale
        if attempt is not None and attempt != (item.question_rejects if kind == "question" else
                                               item.answer_rejects[slot] if slot < item.k else -1):
            return
        item.prompt_tokens += entry["prompt_tokens"]
        item.completion_tokens += entry["completion_tokens"]
        item.requests += 1
        if kind == "question":
            if item.question is None:
                self._on_question(item, entry)
        elif item.question is not None and slot < item.k and item.answers[slot] is None:
            self._on_answer(item, slot, entry)

    def _reject(self, item, entry, reason, attempt):
        self.rejected[entry["kind"]] += 1
        self.sink.reject({"item": item.id, "kind": entry["kind"], "slot": entry["slot"], "attempt": attempt,
                          "reason": reason, "text": entry["text"]})

    def _on_question(self, item, entry):
        try:
            if entry.get("error"):  # a batch error-file line or an unusable output line
                raise ParseError(entry["error"])
            question = parse_question_reply(entry["text"])
        except ParseError as e:
            item.question_rejects += 1
            self._reject(item, entry, str(e), item.question_rejects)
            if item.question_rejects > self.cfg.max_parse_retries:
                self._drop(item, "unparseable_question")
            else:
                self.queue.append((item.id, "question", 0))
            return
        source = self.contam.query(question) if self.contam is not None else None
        if source is not None:
            self.contaminated_by[source[0]] += 1
            self._drop(item, "contaminated")
            return
        dup = self.near.query(question)
        if dup is not None:
            (kind, _), sim = dup
            self._drop(item, "seed_copy" if kind == "seed" else "duplicate_exact" if sim == 1.0 else "near_duplicate")
            return
        item.question = question
        self.near.add(("item", item.id), question)  # reserved now, so concurrent items cannot duplicate it
        self.queue.extend((item.id, "answer", s) for s in range(item.k))

    def _on_answer(self, item, slot, entry):
        try:
            if entry.get("error"):
                raise ParseError(entry["error"])
            solution, answer = parse_answer_reply(entry["text"], item.style)
        except ParseError as e:
            item.answer_rejects[slot] += 1
            self._reject(item, entry, str(e), item.answer_rejects[slot])
            if item.answer_rejects[slot] > self.cfg.max_parse_retries:
                self._drop(item, "unparseable_answer")
            else:
                self.queue.append((item.id, "answer", slot))
            return
        item.answers[slot] = (solution, answer, entry.get("model") or self.cfg.model)
        if all(a is not None for a in item.answers):
            self._finish(item)

    def _same(self, a, b):
        if normalise_answer(a) == normalise_answer(b):
            return True
        if self.equiv is None:
            return False
        try:
            return bool(self.equiv(a, b))
        except Exception:  # grading promises never to raise; a bug there must not kill a paid-for run
            return False

    def _finish(self, item):
        groups = []  # lists of slot indices with equivalent answers, in slot order
        for s, (_, answer, _) in enumerate(item.answers):
            for g in groups:
                if self._same(answer, item.answers[g[0]][1]):
                    g.append(s)
                    break
            else:
                groups.append([s])
        best = max(groups, key=len)  # first biggest group
        if item.k > 1:
            self.voted += 1
            if 2 * len(best) <= item.k:
                self._drop(item, "inconsistent")
                return
        solution, answer, model = item.answers[best[0]]
        record = {"question": item.question, "solution": solution, "answer": answer,
                  "seed_id": self.seeds[item.seed].id, "model": model,
                  "usage": {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                            "requests": item.requests},
                  "style": item.style, "item": item.id}
        if item.k > 1:
            record["consistency"] = {"k": item.k, "agree": len(best)}
        self.sink.record(record)
        self.kept += 1
        self._close(item)

    def _drop(self, item, reason):
        self.dropped[reason] += 1
        self.near.remove(("item", item.id))
        self._close(item)

    def _close(self, item):
        del self.active[item.id]
        self.finished.add(item.id)
        if self.queue:
            self.queue = deque(r for r in self.queue if r[0] != item.id)


# ---------------------------------------------------------------------------------------------------------------
# Files


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_arguments(cfg, n_target, max_items):
    """The arguments that decide the output (file contents by hash; not the key, URL, concurrency or budget)."""
    return {
        "seeds_sha256": _sha256(cfg.seeds),
        "num_questions": n_target,
        "model": cfg.model,
        "style": cfg.style,
        "consistency": cfg.consistency,
        "decontaminate_sha256": sorted(_sha256(p) for p in cfg.decontaminate),
        "seed": cfg.seed,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "max_parse_retries": cfg.max_parse_retries,
        "dedup_ngram": cfg.dedup_ngram,
        "dedup_threshold": cfg.dedup_threshold,
        "decontam_ngram": cfg.decontam_ngram,
        "max_items": max_items,
        "prompts": prompts.prompt_version(),
        "batch": cfg.batch,  # a batch journal holds live batches a synchronous run would pay for again
        "dedup": dedup_descriptor(cfg),  # the algorithm and all its parameters: a resume makes the same calls
        # the vote must replay identically, so a resume may not switch the comparison
        "answer_equivalence": ("fastmath.grading.is_equiv" if _load_equiv() else "normalised exact match")
        if cfg.consistency > 1 else None,
    }


def _fingerprint(args):
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()


class Journal:
    """Append-only JSONL of raw replies; each line is flushed and fsynced before the reply is parsed."""

    def __init__(self, path, header):
        self.path = Path(path)
        # A line that cannot be written whole (full disk, I/O error) is cut off again: fsio.StorageError.
        self._f = AppendFile(self.path, fsync=True, what="the synth journal")
        if self.path.stat().st_size == 0:
            self.append(header)

    def append(self, entry):
        self._f.append(json.dumps(entry, ensure_ascii=False) + "\n")

    def append_many(self, entries):
        """Append entries with one fsync (a downloaded batch file: a per-line fsync would cost minutes); all of
        them or none, as for one line."""
        if entries:
            self._f.append("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))

    def tell(self):
        return self.path.stat().st_size  # the file is unbuffered: its size is what was written

    def close(self):
        self._f.close()


def iter_journal(path, start=0):
    """Yield the header, then every entry of a journal, streaming; a torn last line (crash mid-write) is cut
    off the file once the iteration reaches the end. With `start` (a byte offset at a line start, from a
    snapshot) the entries after it are yielded, without the header.

    Raises:
        SynthError: no header, or a damaged line before the last, naming the file and line.
    """
    torn = None  # (line number, byte offset) of an unreadable line; fatal unless it is the last one
    begin = start  # `start` below is each line's offset
    offset, header_seen = begin, begin > 0
    with open(path, "rb") as f:
        f.seek(begin)
        for line_no, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            if torn is not None:
                where = f"{torn[0]}" if not begin else f"byte {torn[1]}"
                raise SynthError(f"{path}:{where}: damaged journal line; cannot resume from this journal")
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                torn = (line_no, start)
                continue
            if not header_seen:
                if not isinstance(record, dict) or record.get("type") != "header":
                    break
                header_seen = True
            yield record
    if not header_seen:
        raise SynthError(f"{path}:1: not a fastmath synth journal (no header line)")
    if torn is not None:
        with open(path, "r+b") as f:  # the reply on that line is requested again
            f.truncate(torn[1])


SNAPSHOT_VERSION = 1


def write_snapshot(path, fingerprint, journal, records_f, rejects_f, state, subs):
    """Save the replayed state (items, counters, the dedup index, live submissions) with the journal offset and
    output sizes it covers, so a rerun replays only what came after. Atomic (tmp + fsync + rename)."""
    for f in (records_f, rejects_f):
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise write_failed(f.name, e) from None
    offset = journal.tell()
    blob = {"version": SNAPSHOT_VERSION, "fingerprint": fingerprint, "journal_offset": offset,
            "journal_check": _journal_check(journal.path, offset),
            "records_size": records_f.tell(), "rejects_size": rejects_f.tell(), "state": state, "subs": subs}
    with atomic_open(path, "wb", what="the synth snapshot") as f:  # the old snapshot or a whole new one
        pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)


def _journal_check(path, offset, span=1 << 16):
    """sha256 of the journal's first and last 64 KB before `offset`: a journal edited or replaced under a
    snapshot no longer matches it (then the whole journal is replayed and checked)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(min(span, offset)))
        f.seek(max(0, offset - span))
        h.update(f.read(min(span, offset)))
    return h.hexdigest()


def read_snapshot(paths, fingerprint):
    """The snapshot dict when it belongs to this run and the journal and outputs still hold what it covers,
    else None (then the whole journal is replayed). It is fastmath's own pickle beside the output: delete
    it to force a full replay."""
    path = paths["snapshot"]
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except Exception:  # a damaged or foreign snapshot only costs a full replay
        return None
    ok = (isinstance(blob, dict) and blob.get("version") == SNAPSHOT_VERSION and blob.get("fingerprint") == fingerprint
          and paths["journal"].exists() and paths["journal"].stat().st_size >= blob["journal_offset"]
          and paths["records"].exists() and paths["records"].stat().st_size >= blob["records_size"]
          and paths["rejects"].exists() and paths["rejects"].stat().st_size >= blob["rejects_size"]
          and _journal_check(paths["journal"], blob["journal_offset"]) == blob.get("journal_check"))
    return blob if ok else None


class _Sink:
    """Writes records and rejects, one flushed JSONL line each. Both files are rebuilt from the journal on
    resume, so a failed write loses nothing: it stops the run with one sentence (fsio.StorageError)."""

    def __init__(self, records_f, rejects_f, paths=None):
        self.records_f, self.rejects_f, self.paths = records_f, rejects_f, paths or {}

    def _write(self, f, kind, rec):
        try:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        except OSError as e:
            raise write_failed(self.paths.get(kind, f.name), e) from None

    def record(self, rec):
        self._write(self.records_f, "records", rec)

    def reject(self, rec):
        self._write(self.rejects_f, "rejects", rec)


def _load(path, what):
    try:
        return load_problems(path)
    except ValueError as e:
        raise SynthError(f"{what} file {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# The run


def dedup_descriptor(cfg):
    """The near-duplicate algorithm and every parameter that changes its decisions (part of the fingerprint)."""
    if cfg.dedup == "exact":
        return {"algorithm": "prefix-filter-exact", "ngram": cfg.dedup_ngram, "threshold": cfg.dedup_threshold}
    return MinHashLSHIndex.describe_params(cfg.dedup_ngram, cfg.dedup_threshold)


def _near_index(cfg, seeds):
    if cfg.dedup == "exact":
        near = NearDupIndex(cfg.dedup_ngram, cfg.dedup_threshold, reference=[s.question for s in seeds])
    elif cfg.dedup == "minhash":
        near = MinHashLSHIndex(cfg.dedup_ngram, cfg.dedup_threshold)
    else:
        raise SynthError(f"unknown --dedup {cfg.dedup!r}; expected minhash or exact")
    for i, s in enumerate(seeds):
        near.add(("seed", i), s.question)
    return near


def _setup(cfg):
    """Validated inputs: (seeds, n_target, max_items, price)."""
    if (cfg.num_questions is None) == (cfg.per_seed is None):
        raise SynthError("Give exactly one of --num-questions and --per-seed.")
    if cfg.consistency < 1 or cfg.concurrency < 1:
        raise SynthError("--consistency and --concurrency must be at least 1.")
    if cfg.batch and not 1 <= cfg.batch_size <= 50_000:
        raise SynthError("--batch-size must be between 1 and 50000 (the Batch API's limit per file).")
    seeds = _load(cfg.seeds, "seeds")
    n_target = cfg.num_questions if cfg.num_questions is not None else cfg.per_seed * len(seeds)
    if n_target < 1:
        raise SynthError("Nothing to do: the number of questions must be at least 1.")
    max_items = cfg.max_items if cfg.max_items is not None else 3 * n_target + 10
    price = run_price(cfg)
    if cfg.max_cost is not None and price is None:
        raise SynthError(f"No price known for model '{cfg.model}'; give --price-in and --price-out to use --max-cost.")
    return seeds, n_target, max_items, price


def run_price(cfg):
    """USD per million (input, output) tokens actually paid: the table's synchronous price, halved for the Batch
    API; --price-in/--price-out, when given, are the price of the mode being run."""
    if cfg.price_in is not None and cfg.price_out is not None:
        return (cfg.price_in, cfg.price_out)
    base = model_price(cfg.model)
    if base is not None and cfg.batch:
        base = (base[0] * BATCH_DISCOUNT, base[1] * BATCH_DISCOUNT)
    if cfg.price_in is None and cfg.price_out is None:
        return base
    if base is None:
        return None
    return (cfg.price_in if cfg.price_in is not None else base[0], cfg.price_out if cfg.price_out is not None else base[1])


def preview(cfg):
    """The cost preview of `--dry-run`: requests per stage, estimated tokens and cost; sends nothing.

    Prompt tokens are those of the rendered prompts (characters / 4 + 4 per message; no tokenizer is loaded).
    The answer prompt is rendered with the seed question standing in for the question still to be created.
    Completion tokens are a rule of thumb: create+verify = 3 x the seed question's tokens + 150 (created
    question, a worked check, final question); solve = 2 x + 100; each capped by --max-tokens. Items dropped as
    duplicates, contaminated or inconsistent are replaced, so the real count is higher by the drop rate.
    """
    from .batch import estimate_tokens

    seeds, n_target, _, _ = _setup(cfg)
    plan = ItemPlan(len(seeds), cfg.seed)
    uses = Counter()  # seed index -> items of the first n_target that use it
    full, rest = divmod(n_target, len(seeds))
    for i in range(len(seeds)):
        uses[i] = full
    for i in range(rest):
        uses[plan.seed_index(full * len(seeds) + i)] += 1
    q_prompt = a_prompt = q_out = a_out = 0
    for i, count in uses.items():
        if not count:
            continue
        seed = seeds[i]
        style = cfg.style if cfg.style != "auto" else seed.style
        q_tokens = estimate_tokens([{"content": seed.question}]) - 4
        cap = cfg.max_tokens if cfg.max_tokens is not None else float("inf")
        q_prompt += count * estimate_tokens(prompts.question_messages(seed.question, style))
        a_prompt += count * estimate_tokens(prompts.answer_messages(seed.question, style))
        q_out += count * min(3 * q_tokens + 150, cap)
        a_out += count * min(2 * q_tokens + 100, cap)
    k = cfg.consistency
    stages = [
        {"stage": "1 create+verify", "requests": n_target, "prompt_tokens": int(q_prompt),
         "completion_tokens": int(q_out)},
        {"stage": f"2 solve (x{k})" if k > 1 else "2 solve", "requests": n_target * k,
         "prompt_tokens": int(a_prompt * k), "completion_tokens": int(a_out * k)},
    ]
    price = run_price(cfg)
    other = None if price is None else tuple(x / BATCH_DISCOUNT if cfg.batch else x * BATCH_DISCOUNT for x in price)
    prices = {"batch": price, "sync": other} if cfg.batch else {"sync": price, "batch": other}
    tokens_in = sum(st["prompt_tokens"] for st in stages)
    tokens_out = sum(st["completion_tokens"] for st in stages)
    return {
        "records": n_target, "model": cfg.model, "stages": stages,
        "requests_total": sum(st["requests"] for st in stages),
        "prompt_tokens": tokens_in, "completion_tokens": tokens_out,
        "price_per_million_tokens": prices,
        "cost_usd": {m: None if p is None else (tokens_in * p[0] + tokens_out * p[1]) / 1e6 for m, p in prices.items()},
        "estimator": "prompt tokens = characters/4 + 4 per message of the rendered prompts; completion tokens = "
                     "3 x seed tokens + 150 (create+verify), 2 x seed tokens + 100 (solve), capped by --max-tokens; "
                     "dropped items are replaced, so add the drop rate",
    }


def run_synth(cfg, api_key):
    """Run (or resume) a synthesis job; returns the report dict (also written to the report file).

    Raises:
        SynthError: bad inputs, a journal made with other arguments, or an API that cannot be used
        (bad key, unreachable endpoint, retries exhausted); the message is one sentence for the user.
    """
    from .client import ChatClient, FatalAPIError, RetryPolicy  # imports openai

    if not api_key:
        raise SynthError("Set OPENAI_API_KEY to your API key (any non-empty value for a local server).")
    seeds, n_target, max_items, price = _setup(cfg)
    contam, decontam_sizes = None, {}
    if cfg.decontaminate:
        contam = ContaminationIndex(cfg.decontam_ngram)
        for path in cfg.decontaminate:
            problems = _load(path, "decontamination")
            decontam_sizes[Path(path).name] = len(problems)
            for p in problems:
                contam.add(p.question, (Path(path).name, p.id))

    paths = output_paths(cfg.out)
    args = run_arguments(cfg, n_target, max_items)
    header = {"type": "header", "version": JOURNAL_VERSION, "fingerprint": _fingerprint(args), "args": args,
              "run_id": os.urandom(6).hex(),  # names this output's files and batches at the API
              "paths": {"seeds": str(cfg.seeds), "decontaminate": [str(p) for p in cfg.decontaminate]}}
    entries = iter(())
    if paths["journal"].exists():
        entries = iter_journal(paths["journal"])
        old = next(entries)
        if old.get("fingerprint") != header["fingerprint"]:
            old_args = old.get("args", {})
            diff = [k for k in sorted(set(args) | set(old_args)) if old_args.get(k) != args.get(k)]
            raise SynthError(
                f"{paths['records']} was started with different arguments ({', '.join(diff) or 'version'} differ); "
                "rerun with the original arguments to resume, or choose another --out."
            )
        header["run_id"] = old.get("run_id", header["run_id"])
    elif paths["records"].exists() and paths["records"].stat().st_size > 0:
        raise SynthError(f"{paths['records']} exists but has no journal {paths['journal'].name}; "
                         "refusing to overwrite it, choose another --out.")
    paths["records"].parent.mkdir(parents=True, exist_ok=True)

    from .batch import Submissions

    equiv = _load_equiv() if cfg.consistency > 1 else None
    snap = read_snapshot(paths, header["fingerprint"]) if paths["journal"].exists() else None
    if snap is not None:
        # Resume from the snapshot: cut the outputs back to what it covers, replay only the journal after it.
        # A failed write below leaves the outputs longer than the snapshot says: the next run cuts them again.
        entries = iter_journal(paths["journal"], start=snap["journal_offset"])
        tmp = {}
        for k in ("records", "rejects"):
            with open(paths[k], "r+b") as f:
                f.truncate(snap[k + "_size"])
        records_f = open(paths["records"], "a", encoding="utf-8")
        rejects_f = open(paths["rejects"], "a", encoding="utf-8")
        sink = _Sink(records_f, rejects_f, paths)
        state, subs = snap["state"], snap["subs"]
        state.attach(cfg, seeds, contam, sink, equiv)
    else:
        # Replay into fresh copies of the record and reject files, then swap them in; the handles stay open
        # for live appends (a rename keeps an open file).
        tmp = {k: paths[k].with_name(paths[k].name + ".tmp") for k in ("records", "rejects")}
        records_f = open(tmp["records"], "w", encoding="utf-8")
        rejects_f = open(tmp["rejects"], "w", encoding="utf-8")
        sink = _Sink(records_f, rejects_f, paths)
        state = SynthState(cfg, seeds, n_target, max_items, _near_index(cfg, seeds), contam, sink, equiv)
        subs = Submissions()
    del snap

    def apply(entry):
        """One journal entry (replayed or live) into the state: the same code path both ways."""
        kind = entry.get("type")
        if kind is None:
            subs.on_reply(entry)
            state.on_reply(entry)
        elif kind == "malformed":
            state.rejected["batch_line"] += 1
            sink.reject({"sub": entry["sub"], "kind": "batch_line", "reason": entry["reason"], "text": entry["text"]})
        else:
            if kind == "submit":
                for cid in entry["ids"]:  # the items of live requests exist from now on
                    state._item(int(cid[1:cid.index("-")]))
            subs.on_journal(entry)

    replayed = 0
    try:
        for entry in entries:
            apply(entry)
            replayed += 1
        if not cfg.batch:
            state.rebuild_queue()
    except StorageError as e:  # fresh copies are half-written: never swap them in
        for f, k in ((records_f, "records"), (rejects_f, "rejects")):
            _close_quietly(f)
            if k in tmp:
                tmp[k].unlink(missing_ok=True)
        raise StorageError(f"{e}; every reply is safe in the journal: free some space and rerun the same command "
                           "to resume") from None
    for k in tmp:
        (records_f if k == "records" else rejects_f).flush()
        os.replace(tmp[k], paths[k])
    resumed = {"replies": replayed, "kept": state.kept, "from_snapshot": not tmp}

    journal = Journal(paths["journal"], header)

    def checkpoint():
        write_snapshot(paths["snapshot"], header["fingerprint"], journal, records_f, rejects_f, state, subs)

    policy = RetryPolicy(max_retries=cfg.max_retries, base_delay=cfg.retry_base_delay)
    start = time.time()
    stopped, error, retries, batch_info = None, None, 0, None
    try:
        if cfg.batch:
            from .batch import BatchAPI, BatchRunner

            api = BatchAPI(api_key, cfg.base_url, policy, timeout=cfg.timeout)
            runner = BatchRunner(state, subs, journal, api, cfg, price, header, apply, checkpoint=checkpoint)
            try:
                stopped = runner.run()
            finally:
                retries = api.retries
                batch_info = {"submissions_live": len(subs.live), "submissions_closed": subs.closed,
                              "rounds": subs.round, "batches_created_this_session": runner.batches_created,
                              "reserved_usd": round(subs.reserved(), 6)}
                api.close()
        else:
            client = ChatClient(api_key, cfg.base_url, cfg.model, timeout=cfg.timeout, temperature=cfg.temperature,
                                max_tokens=cfg.max_tokens, policy=policy)
            try:
                stopped = asyncio.run(_run_live(state, client, journal, cfg, price, n_target))
            finally:
                retries = client.retries
        checkpoint()
    except FatalAPIError as e:
        stopped, error = "error", str(e)
        checkpoint()  # the state is consistent: the error came between requests, not inside `apply`
    finally:  # after a failed write a close may fail again: the first error is the one to report
        journal.close()
        _close_quietly(records_f)
        _close_quietly(rejects_f)
    if stopped is None and state.kept < n_target:
        stopped = "max_items"
    report = _report(state, cfg, paths, n_target, max_items, price, stopped, error, retries,
                     time.time() - start, resumed, decontam_sizes)
    if batch_info is not None:
        report["batch"] = batch_info
    atomic_write_json(paths["report"], report, hint="the records are written; free some space and rerun the "
                      "same command to write the report")
    if error is not None:
        raise SynthError(error)
    return report


def _close_quietly(f):
    try:
        f.close()
    except OSError:
        pass


def _cost(usage, price):
    if price is None:
        return None
    return (usage["prompt_tokens"] * price[0] + usage["completion_tokens"] * price[1]) / 1e6


async def _run_live(state, client, journal, cfg, price, n_target):
    """Send requests until done, the budget is spent, or a fatal error; returns the stop reason or None."""
    from tqdm import tqdm

    bar = tqdm(total=n_target, initial=state.kept, unit="q", desc="synth", disable=not cfg.progress,
               dynamic_ncols=True)

    def postfix():
        cost = _cost(state.usage, price)
        tokens = state.usage["prompt_tokens"] + state.usage["completion_tokens"]
        spend = f"${cost:.2f}" if cost is not None else f"{tokens} tok"
        bar.set_postfix_str(f"{spend} dropped={sum(state.dropped.values())} rejects={sum(state.rejected.values())}")

    postfix()
    in_flight = {}  # task -> request
    stopped, fatal = None, None
    try:
        while True:
            while stopped is None and fatal is None and not state.done():
                if cfg.max_cost is not None:
                    spent = _cost(state.usage, price)
                    if state.usage["requests"] == 0:
                        if in_flight:  # no cost known yet: one request at a time under a budget
                            break
                    elif spent + len(in_flight) * spent / state.usage["requests"] >= cfg.max_cost:
                        stopped = "max_cost"  # no new requests; those in flight finish and are journaled
                        break
                if len(in_flight) >= cfg.concurrency:
                    break
                request = state.next_request()
                if request is None:
                    break
                in_flight[asyncio.ensure_future(client.complete(state.messages(request)))] = request
            if not in_flight:
                break
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: in_flight[t]):
                item_id, kind, slot = in_flight.pop(task)
                if task.exception() is not None:
                    fatal = fatal or task.exception()
                    continue
                reply = task.result()
                entry = {"item": item_id, "kind": kind, "slot": slot, "text": reply.text,
                         "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                         "model": reply.model, "finish_reason": reply.finish_reason, "id": reply.id,
                         "time": round(time.time(), 3)}
                try:
                    journal.append(entry)  # on disk before it is parsed
                except StorageError as e:
                    raise SynthError(await _stop_after_write_failure(e, entry, task, done, in_flight)) from None
                kept = state.kept
                try:
                    state.on_reply(entry)
                except StorageError as e:  # a record or reject: this reply is journaled, later ones may not be
                    raise SynthError(await _stop_after_write_failure(e, None, task, done, in_flight)) from None
                bar.update(state.kept - kept)
                postfix()
            if fatal is not None:
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
                in_flight.clear()
                raise fatal
    finally:
        bar.close()
        await client.close()
    return stopped


async def _stop_after_write_failure(error, entry, task, done, in_flight) -> str:
    """Stop at once (no further request is sent) and say which paid-for replies could not be saved: `entry`
    (the reply whose journal line failed, or None) and the other replies received with it."""
    unsaved = ([entry] if entry else []) + [t for t in done if t is not task and t in in_flight
                                            and not t.cancelled() and t.exception() is None]
    for t in in_flight:
        t.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)
    n, cancelled = len(unsaved), len([t for t in in_flight if t not in done])
    in_flight.clear()
    if n == 0:
        lost = "every reply received is safe in the journal"
    else:
        lost = f"{n} paid-for repl{'y' if n == 1 else 'ies'}"
        if entry:
            lost += (f" (item {entry['item']} {entry['kind']}, {entry['prompt_tokens'] + entry['completion_tokens']} "
                     f"tokens{', and others' if n > 1 else ''})")
        lost += " could not be saved and will be asked again"
    return (f"{error}; stopped before sending more requests: {lost}, {cancelled} request(s) in flight were "
            "cancelled; free some space and rerun the same command to resume from the journal")


def _report(state, cfg, paths, n_target, max_items, price, stopped, error, retries, seconds, resumed, decontam_sizes):
    cost = _cost(state.usage, price)
    return {
        "output": str(paths["records"]),
        "journal": str(paths["journal"]),
        "rejects": str(paths["rejects"]),
        "model": cfg.model,
        "requested": n_target,
        "kept": state.kept,
        "complete": state.kept >= n_target,
        "stopped": stopped,
        "error": error,
        "items_started": state.next_id,
        "max_items": max_items,
        "dropped": {k: state.dropped.get(k, 0) for k in ("duplicate_exact", "near_duplicate", "seed_copy",
                                                          "contaminated", "inconsistent", "unparseable_question",
                                                          "unparseable_answer")},
        "contaminated_by_file": dict(sorted(state.contaminated_by.items())),
        "rejected_replies": {"question": state.rejected.get("question", 0), "answer": state.rejected.get("answer", 0),
                             **({"batch_line": state.rejected.get("batch_line", 0)} if cfg.batch else {})},
        "consistency": {"k": cfg.consistency, "voted": state.voted, "kept": state.voted - state.dropped["inconsistent"],
                        "dropped": state.dropped["inconsistent"]},
        "dedup": dedup_descriptor(cfg),
        "decontamination": {"ngram": cfg.decontam_ngram, "files": decontam_sizes},
        "usage": {k: state.usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "requests")},
        "price_per_million_tokens": {"input": price[0], "output": price[1], "mode": "batch" if cfg.batch else "sync"}
        if price else None,
        "cost_usd": round(cost, 6) if cost is not None else None,
        "max_cost_usd": cfg.max_cost,
        "retries_this_session": retries,
        "seconds_this_session": round(seconds, 3),
        "resumed_from_journal": resumed,
    }
