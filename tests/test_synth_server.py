"""`fastmath synth` against a real HTTP server on 127.0.0.1 (tests/synth_server.py), through the real openai client.

Faults injected: 429 with Retry-After, 500, replies slower than the timeout, malformed content, wrong answers,
duplicate and contaminated questions, a budget, a SIGKILL mid-run, a wrong key, an unreachable endpoint.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_server import FakeOpenAI, created_question, question_numbers  # noqa: E402

from fastmath.commands.synth import command  # noqa: E402
from fastmath.synth.prompts import answer_messages, question_messages  # noqa: E402
from fastmath.synth.pipeline import SynthConfig, SynthError, output_paths, run_synth  # noqa: E402

KEY = "sk-test-5f1b9c-secret"
REPO = Path(__file__).resolve().parents[1]
SEED_WORDS = ["apples", "marbles", "stamps", "pencils", "coins", "books", "shells", "cards", "beads", "cookies",
              "stickers", "buttons", "ribbons", "candles", "tickets", "bottles", "crayons", "feathers", "rocks",
              "keys", "plates", "cups", "hats", "socks", "kites", "bells", "nails", "bricks", "boxes", "pears",
              "lemons", "eggs", "jars", "maps", "pins", "toys", "bowls", "forks", "rings", "nuts"]


def write_seeds(path, n=40):
    """GSM8K-format seeds with distinct questions."""
    lines = []
    for i in range(n):
        w = SEED_WORDS[i % len(SEED_WORDS)]
        q = f"Seed {i}: Ann has {i + 3} {w} and buys {2 * i + 1} more {w}. How many {w} does Ann have now?"
        lines.append(json.dumps({"question": q, "answer": f"{i + 3} + {2 * i + 1} = {3 * i + 4}\n#### {3 * i + 4}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def config(tmp_path, url, **kw):
    kw.setdefault("num_questions", 6)
    kw.setdefault("concurrency", 4)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retry_base_delay", 0.05)
    kw.setdefault("progress", False)
    seeds = kw.pop("seeds", None) or write_seeds(tmp_path / "seeds.jsonl")
    return SynthConfig(seeds=seeds, out=tmp_path / "out.jsonl", base_url=url, **kw)


def check_records(records, n):
    """n records, distinct questions, each answer = a + b of its question (the server's arithmetic)."""
    assert len(records) == n
    assert len({r["question"] for r in records}) == n
    assert len({r["item"] for r in records}) == n
    for r in records:
        a, b = question_numbers(r["question"])
        assert r["answer"] == str(a + b)
        assert r["solution"].endswith(f"The answer is: {a + b}")
        assert r["solution"].count("The answer is") == 1 and "FINAL ANSWER" not in r["solution"]
        assert set(r) >= {"question", "solution", "answer", "seed_id", "model", "usage"}


def assert_key_absent(tmp_path, *texts):
    for f in tmp_path.iterdir():
        assert KEY not in f.read_text(errors="replace"), f
    for t in texts:
        assert KEY not in t


def test_happy_path_usage_cost_and_format(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        report = run_synth(config(tmp_path, srv.url, price_in=2.0, price_out=5.0), KEY)
    records = read_jsonl(tmp_path / "out.jsonl")
    check_records(records, 6)
    seeds = read_jsonl(tmp_path / "seeds.jsonl")
    for r in records:  # the question is the one the server created from this record's seed
        seed_line = int(r["seed_id"].rsplit(":", 1)[1])
        seed_q = seeds[seed_line - 1]["question"]
        assert r["question"] == created_question(seed_q)
    ok = [e for e in srv.log if e["status"] == 200]
    assert len(srv.log) == len(ok) == 12  # one question + one answer call per item, nothing repeated
    assert {e["temperature"] for e in srv.log} == {1.0} and {e["model"] for e in srv.log} == {"gpt-4-turbo"}
    p = sum(e["usage"]["prompt_tokens"] for e in ok)
    c = sum(e["usage"]["completion_tokens"] for e in ok)
    assert report["usage"] == {"prompt_tokens": p, "completion_tokens": c, "requests": 12}
    assert report["cost_usd"] == pytest.approx((2.0 * p + 5.0 * c) / 1e6)
    assert sum(r["usage"]["prompt_tokens"] for r in records) == p
    assert report["kept"] == 6 and report["complete"]
    assert json.loads((tmp_path / "out.report.json").read_text()) == report
    assert_key_absent(tmp_path)


def test_429_retry_after_500_and_timeouts_are_retried(tmp_path):
    faults = {0: {"status": 429, "retry_after": "1"}, 1: {"status": 500}, 2: {"sleep": 1.5}, 5: {"status": 503}}
    with FakeOpenAI(api_key=KEY, behaviour=lambda n, kind, key: faults.get(n)) as srv:
        report = run_synth(config(tmp_path, srv.url, timeout=0.5), KEY)
        srv.wait_for(12 + 4)  # the slow handler logs when it wakes up
    check_records(read_jsonl(tmp_path / "out.jsonl"), 6)
    by_n = {e["n"]: e for e in srv.log}
    for n, fault in faults.items():
        later = [e for e in srv.log if e["key"] == by_n[n]["key"] and e["n"] > n]
        assert later and later[-1]["status"] == 200, fault  # retried until it worked
        if fault.get("status") == 429:  # Retry-After honoured: the retry came at least 1 s after the 429
            assert later[0]["start"] - by_n[n]["end"] >= 0.95
    assert by_n[2]["end"] - by_n[2]["start"] >= 1.4  # the slow reply really outlived the 0.5 s timeout
    assert report["retries_this_session"] == 4
    assert report["usage"]["requests"] == 12  # the timed-out reply was never counted


def test_malformed_replies_go_to_rejects_and_are_retried(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 12)
    rows = read_jsonl(seeds)
    q_key = [hashlib.sha256(question_messages(r["question"], "gsm8k")[0]["content"].encode()).hexdigest() for r in rows]
    a_key2 = hashlib.sha256(answer_messages(created_question(rows[2]["question"]), "gsm8k")[0]["content"].encode())
    seen, lock = Counter(), threading.Lock()

    def behaviour(n, kind, key):
        with lock:
            seen[key] += 1
            first = seen[key] == 1
        if key == q_key[0]:  # never parseable: dropped after max_parse_retries and replaced
            return {"content": "CREATED QUESTION: something without the final field"}
        if key == q_key[1] and first:  # chatty once, then fine
            return {"content": "Sure! Here is a **lovely** new problem about apples."}
        if key == a_key2.hexdigest() and first:
            return {"content": "I think the answer is probably large."}
        return None

    with FakeOpenAI(api_key=KEY, behaviour=behaviour) as srv:
        report = run_synth(config(tmp_path, srv.url, seeds=seeds, num_questions=12, max_parse_retries=1), KEY)
    records = read_jsonl(tmp_path / "out.jsonl")
    check_records(records, 12)
    rejects = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert Counter((r["kind"], r["reason"]) for r in rejects) == {
        ("question", "no 'FINAL CREATED QUESTION:' field"): 3,
        ("answer", "no 'FINAL ANSWER:' or 'The answer is:' line"): 1}
    assert all(r["text"] for r in rejects)
    assert seen[q_key[0]] == 2 and seen[q_key[1]] == 2 and seen[a_key2.hexdigest()] == 2
    assert report["dropped"]["unparseable_question"] == 1
    assert report["rejected_replies"] == {"question": 3, "answer": 1}
    assert "seeds.jsonl:1" not in {r["seed_id"] for r in records}  # its item was dropped, a replacement ran
    assert report["items_started"] == 13


def test_consistency_vote(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 8)
    questions = [created_question(s["question"]) for s in read_jsonl(seeds)]
    key_to_q = {hashlib.sha256(answer_messages(q, "gsm8k")[0]["content"].encode()).hexdigest(): q for q in questions}
    # offsets added to a+b by the 1st, 2nd and 3rd answer call of a question
    offsets = {questions[0]: [0, 1, 2], questions[1]: [0, 5, 0]}
    calls, lock = Counter(), threading.Lock()

    def behaviour(n, kind, key):
        if kind != "answer":
            return None
        q = key_to_q[key]
        with lock:
            i = calls[q]
            calls[q] += 1
        a, b = question_numbers(q)
        return {"answer": a + b + offsets.get(q, [0, 0, 0])[i]}

    with FakeOpenAI(api_key=KEY, behaviour=behaviour) as srv:
        report = run_synth(config(tmp_path, srv.url, seeds=seeds, num_questions=7, consistency=3), KEY)
    records = read_jsonl(tmp_path / "out.jsonl")
    check_records(records, 7)
    by_q = {r["question"]: r for r in records}
    assert questions[0] not in by_q  # three different answers: no majority
    assert by_q[questions[1]]["consistency"] == {"k": 3, "agree": 2}
    assert all(r["consistency"]["agree"] == 3 for q, r in by_q.items() if q != questions[1])
    assert report["consistency"] == {"k": 3, "voted": 8, "kept": 7, "dropped": 1}
    assert sum(1 for e in srv.log if e["kind"] == "answer") == 24


def test_duplicates_and_contamination_are_dropped_and_replaced(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, 10)
    rows = read_jsonl(seeds)
    rows.append({"problem": "Compute $\\dbinom{8}{4}$ and add the number of edges of a cube.",
                 "solution": "$70 + 12 = \\boxed{82}$"})  # a MATH-format seed: MATH-style prompts
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    created = [created_question(r.get("question") or r.get("problem")) for r in rows]
    near = created[7].replace(" later ", " then ")
    assert near != created[7]
    replies = {3: created[2], 4: rows[4]["question"], 6: near}  # exact duplicate, copy of its seed, near duplicate

    def key(i):
        style = "math" if i == 10 else "gsm8k"
        text = question_messages(rows[i].get("question") or rows[i].get("problem"), style)[0]["content"]
        return hashlib.sha256(text.encode()).hexdigest()

    faults = {key(i): {"content": f"CREATED QUESTION: x\nFINAL CREATED QUESTION: {q}"} for i, q in replies.items()}
    test_file = tmp_path / "test.jsonl"  # an evaluation set holding seed 5's created question, reworded at the end
    test_file.write_text(json.dumps({"question": created[5][:-12] + " in the end?", "answer": "#### 1"}) + "\n")
    with FakeOpenAI(api_key=KEY, behaviour=lambda n, kind, k: faults.get(k)) as srv:
        # max_items = 11: exactly one pass over the 11 seeds, so the run ends one record short
        report = run_synth(config(tmp_path, srv.url, seeds=seeds, num_questions=8, max_items=11, concurrency=2,
                                  decontaminate=(test_file,)), KEY)
    records = read_jsonl(tmp_path / "out.jsonl")
    check_records(records, 7)
    assert created[5] not in {r["question"] for r in records}
    assert report["dropped"] == {"duplicate_exact": 1, "near_duplicate": 1, "seed_copy": 1, "contaminated": 1,
                                 "inconsistent": 0, "unparseable_question": 0, "unparseable_answer": 0}
    assert report["contaminated_by_file"] == {"test.jsonl": 1}
    assert report["decontamination"]["files"] == {"test.jsonl": 1}
    assert report["items_started"] == 11 and report["stopped"] == "max_items" and not report["complete"]
    styles = {r["seed_id"]: r["style"] for r in records}
    assert styles["seeds.jsonl:11"] == "math" and styles["seeds.jsonl:1"] == "gsm8k"
    assert len(srv.log) == 11 + 7


def test_max_cost_stops_cleanly_then_resumes_with_a_bigger_budget(tmp_path):
    with FakeOpenAI(api_key=KEY, delay=0.05) as srv:
        cfg = config(tmp_path, srv.url, num_questions=20, price_in=1000.0, price_out=1000.0, max_cost=1.5)
        report = run_synth(cfg, KEY)
        assert report["stopped"] == "max_cost" and not report["complete"]
        assert 0 < report["kept"] < 20
        journal = read_jsonl(tmp_path / "out.journal.jsonl")[1:]
        served = [e for e in srv.log if e["status"] == 200]
        # every reply the server sent (in-flight ones included) was journaled: nothing paid for was lost
        assert {e["id"] for e in served} == {e["id"] for e in journal}
        per_request = report["cost_usd"] / report["usage"]["requests"]
        assert 1.5 - per_request <= report["cost_usd"] <= 1.5 + 4 * 2 * per_request
        n_before = len(srv.log)
        cfg.max_cost = None
        report2 = run_synth(cfg, KEY)
    # resumed from the state snapshot written when the first run stopped: nothing of the journal replayed
    assert report2["complete"] and report2["resumed_from_journal"] == {"replies": 0, "kept": report["kept"],
                                                                       "from_snapshot": True}
    check_records(read_jsonl(tmp_path / "out.jsonl"), 20)
    keys = Counter(e["key"] for e in srv.log)
    assert max(keys.values()) == 1 and len(srv.log) > n_before  # nothing asked twice across the two runs


def test_torn_journal_line_is_dropped_and_a_damaged_one_is_an_error(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        cfg = config(tmp_path, srv.url, num_questions=4)
        run_synth(cfg, KEY)
        journal = output_paths(cfg.out)["journal"]
        lines = journal.read_text().splitlines(keepends=True)
        # a crash mid-write of the last answer: its reply is requested again, nothing else
        journal.write_text("".join(lines[:-1]) + lines[-1][:25])
        n = len(srv.log)
        report = run_synth(cfg, KEY)
        assert report["complete"] and len(srv.log) == n + 1 and srv.log[-1]["kind"] == "answer"
        check_records(read_jsonl(cfg.out), 4)
        assert journal.read_text().splitlines()[-1].startswith('{"item"')
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:2]) + "{oops\n" + "".join(lines[2:]))
        with pytest.raises(SynthError, match=re.escape(f"{journal}:3: damaged journal line")):
            run_synth(cfg, KEY)


def _cli(args, key=KEY, **kw):
    env = dict(os.environ, OPENAI_API_KEY=key, PYTHONPATH=str(REPO))
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "fastmath.cli", "synth", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_midway_then_resume_gives_exactly_n_records(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 40)
    out = tmp_path / "out.jsonl"
    args = ["--seeds", str(seeds), "--out", str(out), "--num-questions", "30", "--concurrency", "4", "--seed", "7",
            "--timeout", "10", "--no-progress"]
    with FakeOpenAI(api_key=KEY, delay=0.15) as srv:
        proc = _cli(["--base-url", srv.url, *args])
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first_run = len(srv.log)
        partial = read_jsonl(out)
        assert 8 <= len(partial) < 30
        journal1 = read_jsonl(output_paths(out)["journal"])[1:]
        proc = _cli(["--base-url", srv.url, *args])
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    records = read_jsonl(out)
    check_records(records, 30)
    assert [r["question"] for r in records[:len(partial)]] == [r["question"] for r in partial]
    # no request repeated for a reply that had been received (journaled) before the kill
    received = {e["id"] for e in journal1}
    key_of = {e["id"]: e["key"] for e in srv.log if "id" in e}
    counts = Counter(e["key"] for e in srv.log)
    assert received and all(counts[key_of[i]] == 1 for i in received)
    # only requests in flight at the kill (at most --concurrency) were sent again
    assert sum(c - 1 for c in counts.values()) <= 4
    assert len(srv.log) > first_run
    assert "records   30 / 30" in stdout
    assert_key_absent(tmp_path, stdout, stderr)


def test_wrong_key_is_one_clear_sentence(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    with FakeOpenAI(api_key=KEY) as srv:
        result = CliRunner().invoke(command, ["--seeds", str(seeds), "--out", str(tmp_path / "o.jsonl"),
                                              "--num-questions", "3", "--base-url", srv.url, "--no-progress"],
                                    env={"OPENAI_API_KEY": "sk-wrong-key-123"})
    assert result.exit_code == 1
    expected = f"Error: The API at {srv.url} rejected the key in OPENAI_API_KEY (401 Unauthorized)."
    assert result.output.strip() == expected
    assert all(e["status"] == 401 for e in srv.log) and len(srv.log) <= 4
    assert "sk-wrong-key-123" not in (tmp_path / "o.journal.jsonl").read_text()


def test_unreachable_endpoint_and_missing_key(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    args = ["--seeds", str(seeds), "--out", str(tmp_path / "o.jsonl"), "--num-questions", "2", "--base-url", url,
            "--no-progress"]
    t = time.time()
    result = CliRunner().invoke(command, args, env={"OPENAI_API_KEY": KEY})
    assert time.time() - t < 30
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: Cannot reach the API endpoint {url} (connection error")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(command, args, env={"OPENAI_API_KEY": ""})
    assert result.exit_code == 1 and "OPENAI_API_KEY" in result.output


def test_resume_with_other_arguments_and_bad_files_are_clear_errors(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 6)
    out = tmp_path / "o.jsonl"
    base = ["--seeds", str(seeds), "--out", str(out), "--no-progress"]
    runner = CliRunner(env={"OPENAI_API_KEY": KEY})
    with FakeOpenAI(api_key=KEY) as srv:
        ok = runner.invoke(command, [*base, "--num-questions", "3", "--base-url", srv.url])
        assert ok.exit_code == 0, ok.output
        # same arguments (another concurrency is fine): resumes, nothing requested
        n = len(srv.log)
        again = runner.invoke(command, [*base, "--num-questions", "3", "--base-url", srv.url, "--concurrency", "2"])
        assert again.exit_code == 0 and len(srv.log) == n and "records   3 / 3" in again.output
        other = runner.invoke(command, [*base, "--num-questions", "3", "--base-url", srv.url, "--model", "gpt-4o"])
        assert other.exit_code == 1 and "different arguments (model differ)" in other.output
        assert len(srv.log) == n
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "ok?", "answer": "#### 1"}) + "\n{not json\n")
    r = runner.invoke(command, ["--seeds", str(bad), "--out", str(tmp_path / "b.jsonl"), "--num-questions", "1"])
    assert r.exit_code == 1 and f"{bad}:2: not valid JSON" in r.output
    bad.write_text(json.dumps({"text": "no question here"}) + "\n")
    r = runner.invoke(command, ["--seeds", str(bad), "--out", str(tmp_path / "b.jsonl"), "--num-questions", "1"])
    assert r.exit_code == 1 and f"{bad}:1: unknown problem record" in r.output
    (tmp_path / "plain.jsonl").write_text("precious\n")
    r = runner.invoke(command, [*base[:2], "--out", str(tmp_path / "plain.jsonl"), "--num-questions", "1"])
    assert r.exit_code == 1 and "refusing to overwrite" in r.output
    r = runner.invoke(command, base)
    assert r.exit_code == 1 and "exactly one of --num-questions and --per-seed" in r.output
    with pytest.raises(SynthError, match="price"):
        run_synth(SynthConfig(seeds=seeds, out=tmp_path / "x.jsonl", num_questions=1, model="my-model",
                              max_cost=1.0), KEY)


def test_import_does_not_pull_torch():
    code = ("import sys, fastmath.synth, fastmath.synth.parse, fastmath.synth.dedup, fastmath.synth.prompts, "
            "fastmath.synth.client, fastmath.synth.pipeline, fastmath.commands.synth; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
