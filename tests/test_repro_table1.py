"""Table 1 in miniature: the skeleton parser, the teacher's training data, decontamination, and the stage end to
end on tiny sizes with every reported figure recomputed from the files it wrote."""
import hashlib
import importlib.util
import json
import math
import random
import re
import sys
import threading
from fractions import Fraction
from pathlib import Path

import pytest

from fastmath import grading, metrics
from fastmath.data import encode_prompt, record_to_example, render_prompt
from fastmath.serve.protocol import ChatCompletionRequest
from fastmath.serve.text import encode_text, render_chat
from fastmath.synth import procedural as P
from fastmath.synth import teacher_tasks as T
from fastmath.synth.parse import normalise_answer, parse_answer_reply, parse_question_fields, parse_question_reply
from fastmath.synth.skeleton import exact_answer, parse_question, question_key, skeleton_key, solve

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_server import FakeOpenAI  # noqa: E402

# Unnamed options fill from procedural.DEFAULT_CONFIG: pin the start range and carries these specs were written for.
PIN = " max_start=0 carry=true"
SPECS = [  # every operation, one to five steps, both solution styles
    "min_steps=1 max_steps=5 max_operand=20 max_factor=4 max_value=200 ops=add,sub,mul,div style=verbose" + PIN,
    "min_steps=1 max_steps=4 max_operand=20 max_factor=3 max_value=100 ops=add,sub,mul style=terse" + PIN,
    "min_steps=2 max_steps=2 max_operand=9 max_value=9 ops=add,sub style=terse" + PIN,
    P.spec_of(P.DEFAULT_CONFIG),  # the demo default: 3-digit starts, no carries
]


def _script():
    for name, file in (("repro_paper", "repro_paper.py"), ("repro_table1", "repro_table1.py")):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, REPO / "bench" / file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # dataclasses look their module up while the file executes
            spec.loader.exec_module(mod)
    return sys.modules["repro_table1"]


def _fold(start, ops):
    """Reference value of a skeleton: plain integer arithmetic, left to right."""
    v = start
    for op, x in ops:
        v = {"add": v + x, "sub": v - x, "mul": v * x, "div": v // x}[op]
    return v


# ----------------------------------------------------------------------------------------------------------
# Skeleton parser


@pytest.mark.parametrize("spec", SPECS)
def test_every_generated_question_parses_back_to_its_skeleton(spec):
    cfg = P.parse_procedural(spec)
    for split in ("train", "test"):
        for r in P.generate(1500, cfg, split, seed=5):
            sk = parse_question(r["question"])
            assert sk == (r["start"], [tuple(o) for o in r["ops"]]), r["question"]
            assert exact_answer(r["question"]) == r["answer"] == str(_fold(*sk))
            assert question_key(r["question"]) == skeleton_key(r["start"], [tuple(o) for o in r["ops"]])
            assert P.split_of(*sk, cfg.test_fraction) == split  # the key is the one the split hashes


def test_whitespace_between_sentences_is_free():
    q = P.generate(1, P.parse_procedural(SPECS[0]), seed=2)[0]["question"]
    assert parse_question(q.replace(". ", ".\n  ")) == parse_question(q) is not None


@pytest.mark.parametrize("text", [
    None, "", "What is 2 + 3?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Mia has 7 stickers. How many stickers does Mia have now?",  # no step
    "Mia has 7 stickers. She buys 5 more stickers. How many stickers does Mia have now? Explain.",
    "Mia has 7 stickers. She buys 5 more apples. How many stickers does Mia have now?",  # another item
    "Mia has 7 stickers. She buys 5 more stickers. How many stickers does Tom have now?",  # another person
    "Mia has 7 stickers. Then she buys 5 more stickers. How many stickers does Mia have now?",  # 'Then' first
    "Mia has 7 stickers. She buys 5 more stickers. She gives 2 stickers to a friend. "
    "How many stickers does Mia have now?",  # a later step without 'Then'
    "Mia has 7 stickers. She buys five more stickers. How many stickers does Mia have now?",
    "Mia has 7 stickers. She eats 5 more stickers. How many stickers does Mia have now?",
    "Mia has -7 stickers. She buys 5 more stickers. How many stickers does Mia have now?",
])
def test_non_procedural_text_gives_none(text):
    assert parse_question(text) is None
    assert exact_answer(text) is None and question_key(text) is None


def test_lenient_parse_reads_mixed_up_items():
    q = ("Leo has 13 books. He gives 2 coins to a friend. Then she buys 19 more pencils. "
         "How many cards does Tom have now?")
    assert parse_question(q) is None  # not the generator's form
    assert parse_question(q, strict=False) == (13, [("sub", 2), ("add", 19)])
    assert exact_answer(q, strict=False) == "30" and question_key(q, strict=False) == "13 sub 2 add 19"
    assert parse_question("What is 2 + 3?", strict=False) is None
    for r in P.generate(300, P.parse_procedural(SPECS[0]), seed=8):  # lenient agrees on well-formed questions
        assert parse_question(r["question"], strict=False) == parse_question(r["question"])


def test_model_written_numbers_are_solved_exactly():
    # A teacher may write steps the generator never would (a remainder, a negative count): still exact.
    q = ("Ana has 7 coins. She shares the coins equally among 2 boxes and keeps one box. "
         "Then she gives 9 coins to a friend. How many coins does Ana have now?")
    assert parse_question(q) == (7, [("div", 2), ("sub", 9)])
    assert solve(*parse_question(q)) == Fraction(7, 2) - 9
    assert exact_answer(q) == "-11/2"
    assert exact_answer(q.replace("among 2 boxes", "among 0 boxes")) is None


# ----------------------------------------------------------------------------------------------------------
# The teacher's training data


def _serve_prompt(content):
    """The prompt `fastmath serve` renders for one user message to a checkpoint trained with template plain."""
    req = ChatCompletionRequest(model="teacher", messages=[{"role": "user", "content": content}])
    return render_chat(req.messages, "plain")


def test_teacher_replies_parse_as_the_pipeline_parses_them(tmp_path):
    cfg = P.parse_procedural(SPECS[1])
    recs = T.teacher_records(cfg, 40, 40, 20, seed=3)
    assert len(recs) == 100
    new_stream = P.generate(40, cfg, "train", seed=1000 + 30 + 1)
    answer_stream = P.generate(40, cfg, "train", seed=1000 + 30 + 2)
    questions = [r for r in recs if "text" in r and "FINAL CREATED QUESTION" in r["text"]]
    answers = [r for r in recs if "question" in r]
    assert len(questions) == 40 and len(answers) == 40
    by_q = {p["question"]: p for p in new_stream}
    for r in questions:
        prompt, sep, reply = r["text"].partition("\nAnswer: ")
        assert sep
        seed_q = prompt.split("Seed problem:\n", 1)[1]
        # the prompt is exactly what the pipeline sends and what the server renders for it
        assert prompt + "\nAnswer:" == _serve_prompt(T.question_prompt(seed_q))
        new_q = parse_question_reply(reply)
        p = by_q[new_q]  # a fresh problem of the stream, not the seed
        assert parse_question(new_q) == (p["start"], [tuple(o) for o in p["ops"]])
        assert parse_question_fields(reply)["verification"] == p["solution"]
        assert parse_question_fields(reply)["created"] == new_q
        assert record_to_example(r).prompt is None  # plain text: the trainer keeps it verbatim
    for r, p in zip(sorted(answers, key=lambda r: r["question"]),
                    sorted(answer_stream, key=lambda p: T.answer_prompt(p["question"]))):
        assert r["question"] == T.answer_prompt(p["question"])
        ex = record_to_example(r)
        assert ex.response == r["solution"]  # nothing appended: the reply is the target as written
        solution, answer = parse_answer_reply(ex.response, "gsm8k")
        assert (solution, answer) == (p["solution"], p["answer"])
        assert r["solution"].endswith(f"FINAL ANSWER: {p['answer']}\nThe answer is: {p['answer']}")
        assert render_prompt(r["question"], "plain") == _serve_prompt(r["question"])


def test_question_records_tokenize_as_prompt_then_reply(tmp_path):
    from fastmath.data import tokenize_examples

    cfg = P.parse_procedural(SPECS[1])
    recs = T.teacher_records(cfg, 60, 60, 60, seed=0)
    tok = T.train_teacher_tokenizer(recs, tmp_path / "t.model", 1200)
    questions = [r for r in recs if "text" in r and "FINAL CREATED QUESTION" in r["text"]]
    answers = [r for r in recs if "question" in r]
    docs = tokenize_examples([record_to_example(r) for r in questions + answers], tok, "plain")
    for i, r in enumerate(questions):
        prompt, _, reply = r["text"].partition("\nAnswer: ")
        seed_q = prompt.split("Seed problem:\n", 1)[1]
        # what the server feeds the model (its own rendering and encoding of the synth request), then the
        # reply: the same ids as the trained document
        served = encode_text(tok, _serve_prompt(T.question_prompt(seed_q)), add_bos=True)
        assert served == encode_prompt(tok, T.question_prompt(seed_q), "plain")
        assert docs.doc(i).tolist() == served + tok.encode(reply, bos=False, eos=True)
        assert docs.n_prompt[i] == 1  # plain text: every token after BOS is a target
        # the call's fixed instructions are one piece: the prompt costs the seed question's tokens plus a few
        assert len(served) <= len(tok.encode("\n" + seed_q, bos=False)) + 4, len(served)
    for j, r in enumerate(answers):
        i = len(questions) + j
        served = encode_text(tok, _serve_prompt(r["question"]), add_bos=True)
        assert docs.n_prompt[i] == len(served) and docs.doc(i)[:len(served)].tolist() == served  # masked prompt
        assert len(served) <= len(tok.encode("\n" + r["question"].split("Problem:\n", 1)[1], bos=False)) + 4
        assert tok.decode(docs.doc(i)[docs.n_prompt[i]:].tolist()) == r["solution"]
    assert all(tok.decode(tok.encode(x)) == x for x in T.tokenizer_sentences(recs[:50]))


def test_teacher_tokenizer_keeps_people_and_items_one_token_everywhere(tmp_path):
    """A question's person and item are one and the same token wherever a space (or the text's start) precedes
    them: everywhere in the replies (a name after a newline, as in "Seed problem:\\nEmma", is another piece).

    Pieces across words fused them with the fixed text around them ("\u2581How\u2581many\u2581apples\u2581does
    \u2581Ines\u2581have\u2581now"), so keeping a question's person and item consistent meant matching different
    tokens, and the repro_table1 teacher mixed them up in every question it wrote."""
    cfg = P.parse_procedural(SPECS[1])
    recs = T.teacher_records(cfg, 60, 60, 60, seed=0)
    tok = T.train_teacher_tokenizer(recs, tmp_path / "t.model", 1200)
    words = {w: tok.encode(w, bos=False) for w in P.NAMES + P.ITEMS}
    assert all(len(ids) == 1 for ids in words.values()), {w: ids for w, ids in words.items() if len(ids) != 1}
    texts = [r.get("text") or render_prompt(r["question"], "plain") + " " + r["solution"] for r in recs]
    for text in texts:
        ids = tok.encode(text, bos=False)
        for w, (wid,) in words.items():
            assert ids.count(wid) == len(re.findall(rf"(?<![^ ]){w}(?![A-Za-z])", text)), (w, text)


# ----------------------------------------------------------------------------------------------------------
# Decontamination, teacher errors, novelty


def test_decontamination_removes_heldout_skeletons_only():
    R1 = _script()
    cfg = P.parse_procedural(SPECS[1])
    held = P.heldout_set(30, cfg, seed=0)
    keys = {question_key(r["question"]) for r in held}
    rng = random.Random(1)
    recs = []
    for r in held[:10]:  # the same arithmetic in other words (other person and item)
        q, _, _ = P._render(rng, r["start"], [tuple(o) for o in r["ops"]])
        recs.append({"question": q, "answer": r["answer"]})
    recs += [{"question": r["question"], "answer": r["answer"]} for r in P.generate(50, cfg, "train", seed=9)]
    recs.append({"question": "What is 2 + 3?", "answer": "5"})
    kept, removed = R1.decontaminate(recs, keys)
    assert removed == 10 and len(kept) == 51
    assert all(question_key(r["question"]) not in keys for r in kept)
    assert kept[-1]["question"] == "What is 2 + 3?"  # no skeleton: nothing to match


def test_teacher_errors_and_novelty():
    R1 = _script()
    cfg = P.parse_procedural(SPECS[1])
    probs = P.generate(40, cfg, "train", seed=4)
    recs = [{"question": p["question"], "answer": str(int(p["answer"]) + (i % 4 == 0))} for i, p in enumerate(probs)]
    recs.append({"question": "What is 2 + 3?", "answer": "5"})
    recs.append({"question": "Leo has 13 books. He gives 2 coins to a friend. Then he buys 19 more pencils. "
                             "How many cards does Tom have now?", "answer": "30"})  # mixed up: 13 - 2 + 19
    recs.append({"question": "Leo has 13 books. He gives 2 coins to a friend. How many cards does Leo have now?",
                 "answer": "12"})  # mixed up and wrong
    e = R1.teacher_errors(recs)
    assert e == {"items": 43, "well_formed": 40, "mixed_up": 2, "unparseable_questions": 1, "wrong_answers": 11,
                 "error_rate": 12 / 43, "error_rate_parsed": 11 / 42}
    recs = recs[:41]
    real = [{"question": p["question"]} for p in probs[:25]]
    nv = R1.novelty(recs, real)
    assert nv["parsed"] == 40 and nv["question_copies_of_real"] == 25
    assert nv["novel_skeletons"] == sum(skeleton_key(p["start"], [tuple(o) for o in p["ops"]]) not in
                                        {skeleton_key(q["start"], [tuple(o) for o in q["ops"]]) for q in probs[:25]}
                                        for p in probs)


# ----------------------------------------------------------------------------------------------------------
# The stage end to end (tiny), against a scripted teacher endpoint


EASY = "min_steps=1 max_steps=2 max_operand=9 max_value=30 ops=add" + PIN


class ScriptedTeacher(FakeOpenAI):
    """Answers fastmath synth's two calls like a teacher that knows the generator, with known faults: every 5th
    created question re-words a held-out problem's skeleton, every 9th is not a procedural question, and the
    answer to every question whose sha256 ends in an even nibble below 6 is off by one."""

    def __init__(self, cfg, heldout, **kw):
        super().__init__(api_key="local", max_requests=10_000, lifetime=600, **kw)
        self.stream = P.iter_problems(cfg, "train", seed=777)
        self.heldout, self.rng = heldout, random.Random(0)
        self.created = 0
        self.wrong, self.from_heldout, self.non_procedural = set(), set(), set()
        self.lock = threading.Lock()

    def _completion(self, body, completion_id, fault):
        content = body["messages"][-1]["content"]
        if "FINAL CREATED QUESTION" in content:
            with self.lock:
                i = self.created
                self.created += 1
                if i % 5 == 4:
                    h = self.heldout[(i // 5) % len(self.heldout)]
                    q, sol, _ = P._render(self.rng, h["start"], [tuple(o) for o in h["ops"]], terse=True)
                    self.from_heldout.add(q)
                elif i % 9 == 8:
                    q, sol = f"A box holds {i} pens and {i + 1} pencils. How many things are in the box?", "x"
                    self.non_procedural.add(q)
                else:
                    p = next(self.stream)
                    q, sol = p["question"], p["solution"]
            text = T.question_reply(q, sol)
        else:
            q = content.split("Problem:\n", 1)[1]
            exact = exact_answer(q)
            answer = int(exact) if exact is not None else 2 * int(re.findall(r"\d+", q)[0]) + 1
            if int(hashlib.sha256(q.encode()).hexdigest()[-1], 16) in (0, 2, 4):
                answer += 1
                with self.lock:
                    self.wrong.add(q)
            text = T.answer_reply(f"Counting step by step gives {answer}.", str(answer))
        usage = {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": completion_id, "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    R1 = _script()
    R = sys.modules["repro_paper"]
    work = tmp_path_factory.mktemp("table1")
    s = R.Settings(difficulty=EASY, dim=32, n_layers=1, n_heads=2, pretrain_examples=1500, pretrain_epochs=0.5,
                   batch_tokens=1024, sizes=(40,), sft_epochs=1.0, sft_lr=1e-3, problems=8, n=6, max_new_tokens=40)
    t = R1.Table1Settings(sizes=(40,), synth_concurrency=8, synth_margin=0.5)  # a fifth goes to decontamination
    heldout = R.read_jsonl(R.heldout_file(s, work))
    cfg = P.parse_procedural(EASY)
    full = {r["question"]: r for r in P.heldout_set(s.problems, cfg, seed=s.seed)}
    # through repro_paper's own stage list, as `bench/repro_paper.py` runs it after the scaling runs
    with ScriptedTeacher(cfg, [full[h["question"]] for h in heldout]) as srv:
        R.register_table1(t, teacher_url=srv.url if srv.url.endswith("/v1") else srv.url + "/v1")
        try:
            whole = R.scaling(s, work, work / "results", quick=True, workers=1)
        finally:
            R.STAGES.clear()
    out = whole["table1"]
    md = (work / "results" / "repro_paper.md").read_text()
    assert "## Table 1 in miniature" in md and md.count("\nreal | 40 |") == 1 and md.count("\nsynthetic | 40 |") == 1
    assert json.loads((work / "results" / "repro_paper.json").read_text())["table1"] == json.loads(json.dumps(out))
    # the real arm at a size the scaling runs have is that scaling model, not a second one
    assert [r for r in out["runs"] if r["arm"] == "real"][0]["samples_file"] == whole["runs"][0]["samples_file"]
    return out, srv, work, s, t


def _path(p):
    return Path(p) if Path(p).is_absolute() else REPO / p


def test_stage_figures_recomputed_from_files(stage):
    out, srv, work, s, t = stage
    saved = json.loads((work / "results" / "repro_table1.json").read_text())["table1"]
    assert saved["teacher_errors"] == out["teacher_errors"] and saved["novelty"] == out["novelty"]
    assert (work / "results" / "repro_table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    synth = [json.loads(x) for x in _path(out["synth"]["records_file"]).read_text().splitlines()]
    assert len(synth) >= t.synth_target()
    # teacher error rate from the scripted teacher's own ledger
    bad = [r for r in synth if r["question"] in srv.wrong or r["question"] in srv.non_procedural]
    assert out["teacher_errors"]["all_kept"]["items"] == len(synth)
    assert out["teacher_errors"]["all_kept"]["error_rate"] == pytest.approx(len(bad) / len(synth))
    assert out["teacher_errors"]["all_kept"]["unparseable_questions"] == sum(r["question"] in srv.non_procedural
                                                                          for r in synth)
    assert 0 < len(bad) < len(synth)
    # decontamination: exactly the re-worded held-out skeletons, none of the real items (disjoint by construction)
    removed = sum(r["question"] in srv.from_heldout for r in synth)
    assert removed > 0
    assert out["decontamination"]["synthetic"] == {"checked": len(synth), "removed": removed}
    assert out["decontamination"]["real"]["removed"] == 0
    student = [json.loads(x) for x in (_path(out["synth"]["records_file"]).parent / "student-40.jsonl")
               .read_text().splitlines()]
    assert len(student) == 40 and not any(r["question"] in srv.from_heldout for r in student)
    clean = [r for r in sorted(synth, key=lambda r: r["item"]) if r["question"] not in srv.from_heldout]
    assert [r["question"] for r in clean[:40]] == [r["question"] for r in student]
    used = clean[:40]
    assert out["teacher_errors"]["used"]["error_rate"] == pytest.approx(
        sum(r["question"] in srv.wrong or r["question"] in srv.non_procedural for r in used) / 40)
    # novelty against the real training set (repro_paper's SFT stream)
    real = [json.loads(x) for x in (work / "data").glob("sft-*-40.jsonl").__next__().read_text().splitlines()]
    real_keys = {question_key(r["question"]) for r in real}
    parsed = [question_key(r["question"]) for r in used if question_key(r["question"]) is not None]
    assert out["novelty"]["parsed"] == len(parsed)
    assert out["novelty"]["novel_skeletons"] == sum(k not in real_keys for k in parsed)


def test_stage_student_metrics_recomputed_from_samples(stage):
    out, srv, work, s, t = stage
    heldout = {}
    for line in _path(out["heldout_file"]).read_text().splitlines():
        rec = json.loads(line)
        heldout[rec["id"]] = rec
    assert sorted((r["arm"], r["size"]) for r in out["runs"]) == [("real", 40), ("synthetic", 40)]
    real = next(r for r in out["runs"] if r["arm"] == "real")
    assert real["reused_scaling_model"] is True  # repro_paper's scaling model at this size
    for run in out["runs"]:
        recs = [json.loads(x) for x in _path(run["samples_file"]).read_text().splitlines()]
        assert sorted(r["id"] for r in recs) == sorted(heldout)
        n = s.n
        passn = ratio = maj = greedy = 0.0
        for r in recs:
            gold = heldout[r["id"]]["answer"]
            verdicts = [(a := grading.extract_answer(x)) is not None and grading.is_equiv(a, gold)
                        for x in r["completions"]]
            assert verdicts == r["verdicts"] and len(verdicts) == n
            c = sum(verdicts)
            passn += c > 0
            ratio += c / n
            idx, _ = metrics.majority_vote([grading.extract_answer(x) for x in r["completions"]], grading.is_equiv)
            maj += idx is not None and verdicts[idx]
            g = grading.extract_answer(r["greedy_completion"])
            greedy += g is not None and grading.is_equiv(g, gold)
        m = len(recs)
        assert run["pass_at_k"][str(n)] == pytest.approx(passn / m)
        assert run["pass_ratio"] == pytest.approx(ratio / m)
        assert run["majority_accuracy"] == pytest.approx(maj / m)
        assert run["greedy_accuracy"] == pytest.approx(greedy / m)
    table = R1_table = _script().markdown_table(out)
    assert R1_table.count("\nreal | 40 |") == 1 and table.count("\nsynthetic | 40 |") == 1
    assert math.isclose(out["novelty"]["novel_skeleton_fraction"],
                        out["novelty"]["novel_skeletons"] / out["novelty"]["parsed"])
