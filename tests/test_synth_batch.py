"""`fastmath synth --batch` against the local fake Batch API (tests/synth_server.py) through the official openai client.

Faults: 429 on create, token_limit_exceeded, a batch failing validation, an expired batch with partial output,
error-file lines, malformed output lines, and SIGKILL at every point between upload and collection. The
server's ledger (lines billed, batches created) shows that nothing is paid for twice.
"""
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_server import FakeOpenAI  # noqa: E402
from test_synth_server import KEY, REPO, check_records, read_jsonl, write_seeds  # noqa: E402

from fastmath.synth.pipeline import SynthConfig, SynthError, output_paths, run_synth  # noqa: E402
from fastmath.synth.prompts import answer_messages, question_messages  # noqa: E402


def config(tmp_path, url, **kw):
    kw.setdefault("num_questions", 12)
    kw.setdefault("batch_size", 5)
    kw.setdefault("poll_interval", 0.005)
    kw.setdefault("retry_base_delay", 0.01)
    kw.setdefault("progress", False)
    seeds = kw.pop("seeds", None) or write_seeds(tmp_path / "seeds.jsonl", 40)
    return SynthConfig(seeds=seeds, out=tmp_path / "out.jsonl", base_url=url, batch=True, **kw)


def check_ledger(srv, out, n):
    """n records; no custom_id billed twice; every billed line journaled; one batch per (file, attempt)."""
    check_records(read_jsonl(out), n)
    billed = Counter(cid for _, cid, _ in srv.billed)
    assert billed and max(billed.values()) == 1, billed.most_common(3)
    journal = read_jsonl(output_paths(out)["journal"])
    replies = {e["custom_id"] for e in journal if "custom_id" in e and not e.get("error")}
    assert set(billed) <= replies | {e["custom_id"] for e in journal if e.get("error")}
    keys = Counter((b["metadata"]["fastmath_run"], b["metadata"]["file"], b["metadata"]["attempt"])
                   for b in srv.batches.values())
    assert max(keys.values()) == 1, keys  # never a second batch for the same file and attempt
    names = Counter(f["meta"]["filename"] for f in srv.files.values() if f["meta"]["purpose"] == "batch")
    assert max(names.values()) == 1  # never a second upload of the same request file
    return journal


def test_batch_rounds_with_faults(tmp_path):
    seen, state = set(), {"creates": 0}

    def behaviour(index, meta, lines):
        key = (meta["round"], meta["stage"], meta["file"].split("-")[-2], meta["attempt"])
        state["creates"] += 1
        if index == 0:
            return {"create_status": 429}  # rate limited: nothing created, retried
        if key == ("1", "question", "1", "0"):
            return {"error_ids": [lines[0]["custom_id"]], "malformed_ids": [lines[1]["custom_id"]], "garbage": 1}
        if key == ("1", "question", "2", "0"):
            return {"expire_after": 1}  # of 2 lines: one billed and kept, one resubmitted
        if key[1] == "answer" and key[0] == "2" and key[3] == "0" and "tle" not in seen:
            seen.add("tle")
            return {"fail": "token_limit_exceeded"}  # the same file goes again as attempt 1
        if key[0] == "2" and key[1] == "question" and "invalid" not in seen:
            seen.add("invalid")
            return {"fail": "invalid_request"}  # failed validation: its requests go to a later round
        return None

    with FakeOpenAI(api_key=KEY, lifetime=120) as srv:
        srv.batch_behaviour = behaviour
        cfg = config(tmp_path, srv.url, price_in=2.0, price_out=6.0)
        report = run_synth(cfg, KEY)
    journal = check_ledger(srv, cfg.out, 12)
    assert report["complete"] and report["kept"] == 12 and report["batch"]["submissions_live"] == 0
    assert seen == {"tle", "invalid"}
    # cost: the server's billed usage at the given (batch) prices
    p = sum(u["prompt_tokens"] for _, _, u in srv.billed)
    c = sum(u["completion_tokens"] for _, _, u in srv.billed)
    assert report["usage"]["prompt_tokens"] == p and report["usage"]["completion_tokens"] == c
    assert report["cost_usd"] == pytest.approx((2.0 * p + 6.0 * c) / 1e6)
    # every batch: 24h window, chat endpoint, metadata naming run, fingerprint, stage, round and file
    header = journal[0]
    for b in srv.batches.values():
        m = b["metadata"]
        assert m["fastmath_run"] == header["run_id"] and header["fingerprint"].startswith(m["fastmath_fingerprint"])
        assert m["stage"] in ("question", "answer") and m["round"].isdigit() and m["file"].endswith(".jsonl")
        assert b["completion_window"] == "24h" and b["endpoint"] == "/v1/chat/completions"
        assert len(b["_lines"]) <= 5
    # the request bodies are the fastmath prompts
    bodies = [line["body"] for b in srv.batches.values() for line in b["_lines"]]
    assert {body["model"] for body in bodies} == {"gpt-4-turbo"} and {body["temperature"] for body in bodies} == {1.0}
    # rejects: the error-file line, the malformed line (with its custom_id) and the garbage line, with reasons
    rejects = read_jsonl(output_paths(cfg.out)["rejects"])
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    assert reasons == {"batch error": 1, "malformed output line": 1, "output line is not valid JSON": 1}, reasons
    assert report["rejected_replies"] == {"question": 2, "answer": 0, "batch_line": 1}
    # the expired batch: its completed line billed once and kept, the other line resubmitted (new batch)
    expired = next(b for b in srv.batches.values() if b["status"] == "expired")
    done = {cid for bid, cid, _ in srv.billed if bid == expired["id"]}
    rest = {line["custom_id"] for line in expired["_lines"]} - done
    assert len(done) == 1 and len(rest) == 1
    assert any(cid in rest for bid, cid, _ in srv.billed if bid != expired["id"])
    # collected files went into the journal with one fsync per file: entries carry their submission
    assert all("sub" in e for e in journal if "custom_id" in e)


def test_no_wait_then_reruns_collect_within_max_cost(tmp_path, capsys):
    with FakeOpenAI(api_key=KEY, lifetime=120) as srv:
        cfg = config(tmp_path, srv.url, num_questions=10, wait=False, price_in=1000.0, price_out=1000.0,
                     max_cost=3.0, progress=True)
        reports = []
        for _ in range(12):
            reports.append(run_synth(cfg, KEY))
            assert reports[-1]["cost_usd"] <= 3.0  # spend never over the cap, at any point
            if reports[-1]["stopped"] != "submitted":
                break
        assert reports[0]["stopped"] == "submitted" and reports[0]["kept"] == 0 and srv.batches
        assert reports[-1]["stopped"] == "max_cost" and not reports[-1]["complete"]
        spent = reports[-1]["cost_usd"]
        assert spent <= 3.0 and len(srv.billed) >= 4
        err = capsys.readouterr().err
        assert "[synth --batch] round 1" in err and "completed/failed/total" in err
        cfg.max_cost, cfg.wait, cfg.progress = None, True, False
        final = run_synth(cfg, KEY)
    assert final["complete"] and final["cost_usd"] > spent
    check_ledger(srv, cfg.out, 10)


KILL_POINTS = ["after_upload", "after_create", "while_polling", "download", "after_download"]


def _cli(args, kill=None):
    env = dict(os.environ, OPENAI_API_KEY=KEY, PYTHONPATH=str(REPO))
    env.pop("OPENAI_BASE_URL", None)
    env.pop("FASTMATH_TEST_KILL_AT", None)
    if kill:
        env["FASTMATH_TEST_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "fastmath.cli", "synth", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_at_every_point_then_resume(tmp_path):
    """SIGKILL at each point of a submission's life, one after another on the same output, then a clean run:
    exactly n records, no request billed twice, no second batch for a file, one upload per file."""
    seeds = write_seeds(tmp_path / "seeds.jsonl", 12)
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(api_key=KEY, lifetime=150) as srv:
        args = ["--seeds", str(seeds), "--out", str(out), "--num-questions", "6", "--batch", "--batch-size", "4",
                "--poll-interval", "0.01", "--no-progress", "--base-url", srv.url, "--price-in", "1",
                "--price-out", "1", "--max-cost", "5"]
        for point in KILL_POINTS:
            before = (len(srv.files), len(srv.batches), len(srv.billed))
            r = _cli(args, kill=point)
            assert r.returncode == -9, (point, r.stderr[-2000:])
            after = (len(srv.files), len(srv.batches), len(srv.billed))
            if point == "after_upload":
                assert after[0] > before[0]  # the upload happened; its id was never journaled
            if point == "after_create":
                assert after[1] > before[1]  # the batch exists; its id was never journaled
            journal = read_jsonl(output_paths(out)["journal"])
            types = Counter(e.get("type", "reply") for e in journal)
            if point == "after_download":
                assert types["reply"] > 0 and types["collected"] == 0  # replies journaled, not yet closed
        r = _cli(args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "records   6 / 6" in r.stdout
    journal = check_ledger(srv, out, 6)
    spent = sum(u["prompt_tokens"] + u["completion_tokens"] for _, _, u in srv.billed) / 1e6
    assert spent <= 5.0
    # the file uploaded before the first kill and the batch created before the second were adopted
    first = [e for e in journal if e.get("type") == "file"][0]
    assert srv.files[first["file_id"]]["meta"]["filename"].endswith("-s0.jsonl")
    assert len(srv.batches) == len({e["batch_id"] for e in journal if e.get("type") == "batch"})


def test_dry_run_counts_rendered_prompts_and_sends_nothing(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 9)
    rows = read_jsonl(seeds)
    with FakeOpenAI(api_key=KEY) as srv:
        r = subprocess.run([sys.executable, "-m", "fastmath.cli", "synth", "--seeds", str(seeds), "--out",
                            str(tmp_path / "o.jsonl"), "--num-questions", "9", "--consistency", "3", "--batch",
                            "--dry-run", "--base-url", srv.url], env=dict(os.environ, OPENAI_API_KEY=""),
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert srv.log == [] and not (tmp_path / "o.journal.jsonl").exists()
    # independent reference: each seed used once; chars/4 (rounded up) + 4 per message of the rendered prompts
    q = sum(math.ceil(len(question_messages(x["question"], "gsm8k")[0]["content"]) / 4) + 4 for x in rows)
    a = 3 * sum(math.ceil(len(answer_messages(x["question"], "gsm8k")[0]["content"]) / 4) + 4 for x in rows)
    lines = r.stdout.splitlines()
    assert lines[2].split()[-3:] == ["9", str(q), lines[2].split()[-1]]
    assert lines[3].split()[-3:-1] == ["27", str(a)]
    out_tokens = int(lines[4].split()[-1])
    cost_sync = (10 * (q + a) + 30 * out_tokens) / 1e6
    assert f"cost at sync prices: ${cost_sync:,.2f}" in r.stdout
    assert f"cost at batch prices: ${cost_sync / 2:,.2f}" in r.stdout
    assert "characters/4" in r.stdout


def test_snapshot_resume_replays_only_the_journal_tail(tmp_path):
    with FakeOpenAI(api_key=KEY, lifetime=120) as srv:
        cfg = config(tmp_path, srv.url, num_questions=8, wait=False)
        snapshot = output_paths(cfg.out)["snapshot"]
        assert run_synth(cfg, KEY)["stopped"] == "submitted"
        old = snapshot.read_bytes()  # covers the submissions of round 1 only
        cfg.wait = True
        assert run_synth(cfg, KEY)["complete"]
        records = (tmp_path / "out.jsonl").read_text()
        ledger = (len(srv.billed), len(srv.batches), len(srv.files))
        n_entries = len(read_jsonl(output_paths(cfg.out)["journal"])) - 1
        snapshot.write_bytes(old)  # an older snapshot: the journal after it is replayed
        r = run_synth(cfg, KEY)
        assert r["resumed_from_journal"]["from_snapshot"] and 0 < r["resumed_from_journal"]["replies"] < n_entries
        assert run_synth(cfg, KEY)["resumed_from_journal"] == {"replies": 0, "kept": 8, "from_snapshot": True}
        snapshot.unlink()  # no snapshot: the whole journal, same outcome
        r = run_synth(cfg, KEY)
        assert r["resumed_from_journal"] == {"replies": n_entries, "kept": 8, "from_snapshot": False}
        assert (tmp_path / "out.jsonl").read_text() == records
        assert (len(srv.billed), len(srv.batches), len(srv.files)) == ledger  # nothing sent again


def test_request_files_split_at_the_byte_limit(tmp_path, monkeypatch):
    from fastmath.synth import batch

    monkeypatch.setattr(batch, "MAX_BYTES_PER_FILE", 4000)  # ~2 request lines: the 200 MB rule in miniature
    with FakeOpenAI(api_key=KEY, lifetime=60) as srv:
        cfg = config(tmp_path, srv.url, num_questions=5, batch_size=50)
        assert run_synth(cfg, KEY)["complete"]
    uploads = [f for f in srv.files.values() if f["meta"]["purpose"] == "batch"]
    assert len(uploads) >= 4 and all(0 < f["meta"]["bytes"] <= 4000 for f in uploads)  # 5 question + 5 answer lines
    check_ledger(srv, cfg.out, 5)


def test_the_dedup_algorithm_is_part_of_the_fingerprint(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        cfg = config(tmp_path, srv.url, num_questions=2)
        run_synth(cfg, KEY)
        n = len(srv.log)
        cfg.dedup = "exact"
        with pytest.raises(SynthError, match=r"different arguments \(dedup differ\)"):
            run_synth(cfg, KEY)
        cfg.dedup, cfg.dedup_threshold = "minhash", 0.8
        with pytest.raises(SynthError, match=r"dedup, dedup_threshold differ"):
            run_synth(cfg, KEY)
        assert len(srv.log) == n


@pytest.mark.parametrize("part,nth", [("journal.jsonl", 3), ("journal.jsonl", 6), ("snapshot.pkl", 1)],
                         ids=["journal-submission", "journal-download", "snapshot"])
def test_batch_write_fault_stops_with_one_sentence_then_rerun_pays_nothing_twice(tmp_path, part, nth):
    """A full disk while journaling a submission or a downloaded file, or writing the snapshot: the run stops
    with a StorageError (one sentence), leaves no temporary, and a rerun ends with the records, paying nothing twice."""
    import errno

    from fastmath import fsio

    seeds = write_seeds(tmp_path / "seeds.jsonl", 40)
    with FakeOpenAI(api_key=KEY, lifetime=120) as srv, fsio.fail_writes(tmp_path / "ref") as clean:
        (tmp_path / "ref").mkdir()
        ref = config(tmp_path / "ref", srv.url, seeds=seeds, num_questions=6)
        run_synth(ref, KEY)
    want = read_jsonl(ref.out)
    hits = [i + 1 for i, p in enumerate(clean.log) if part in Path(p).name]  # the snapshot's temporary too
    assert len(hits) >= nth, (part, len(hits))
    out = tmp_path / "faulty"
    out.mkdir()
    with FakeOpenAI(api_key=KEY, lifetime=120) as srv:
        cfg = config(out, srv.url, seeds=seeds, num_questions=6)
        with fsio.fail_writes(out, at_call=hits[nth - 1], err=errno.ENOSPC) as b, \
                pytest.raises(fsio.StorageError) as e:
            run_synth(cfg, KEY)
        assert b.tripped and part in Path(b.tripped).name
        msg = str(e.value)
        assert "\n" not in msg and "no space left on device" in msg.lower(), msg
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
        run_synth(cfg, KEY)  # the same server: batches it holds are adopted, nothing is billed twice
        check_ledger(srv, cfg.out, 6)
    assert len(read_jsonl(cfg.out)) == len(want) == 6
