"""Reply parsing, answer normalisation, problem files, prompts, prices and the item plan of `fastmath synth`."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from fastmath.synth.parse import (ParseError, load_problems, normalise_answer, parse_answer_reply,
                                  parse_question_fields, parse_question_reply)
from fastmath.synth.pipeline import ItemPlan, model_price, output_paths
from fastmath.synth.prompts import answer_messages, prompt_version, question_messages

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
Q = "A baker sells 12 muffins a day for 3 days. How many muffins does he sell?"


@pytest.mark.parametrize("reply", [
    f"CREATED QUESTION: old one\nVERIFICATION AND MODIFICATION: 12*3=36, fine.\nFINAL CREATED QUESTION: {Q}",
    f"created question: old one\nverification and modification: fine\nfinal created question:   {Q}  \n",
    f"**Created Question:** old one\n\n**Verification and Modification:** fine\n\n**Final Created Question:** {Q}",
    f"**CREATED QUESTION**: old one\n**VERIFICATION AND MODIFICATION**: fine\n**FINAL CREATED QUESTION**: {Q}",
    f"### Created Question\nold one\n### Verification & Modification\nfine\n### Final Created Question\n{Q}\n---",
    f"- CREATED  QUESTION : old\n- VERIFICATION AND MODIFICATION: fine\n- FINAL_CREATED_QUESTION: \"{Q}\"",
    f"FINAL CREATED QUESTION: draft\nVERIFICATION AND MODIFICATION: changed it\nFINAL CREATED QUESTION:\n**{Q}**",
    f"CREATED QUESTION: x\nFINAL CREATED QUESTION：{Q}",  # full-width colon
])
def test_question_reply_variants(reply):
    assert parse_question_reply(reply) == Q


def test_question_fields_keep_multiline_text_and_the_last_final():
    reply = ("CREATED QUESTION: first\nline two\nVERIFICATION AND MODIFICATION: step 1\nstep 2\n"
             "FINAL CREATED QUESTION: one\nFINAL CREATED QUESTION: two\nand more")
    assert parse_question_fields(reply) == {"created": "first\nline two", "verification": "step 1\nstep 2",
                                            "final": "two\nand more"}


@pytest.mark.parametrize("reply, reason", [
    ("", "empty reply"),
    ("Sure, here is a question: how many apples?", "no 'FINAL CREATED QUESTION:' field"),
    ("CREATED QUESTION: a\nVERIFICATION AND MODIFICATION: b", "no 'FINAL CREATED QUESTION:' field"),
    ("CREATED QUESTION: a\nFINAL CREATED QUESTION:   \n", "empty 'FINAL CREATED QUESTION:' field"),
    (f"FINAL CREATED QUESTION: {Q}\nThe answer is: 36", "contains an answer"),
    # the field name inside a sentence is not a field
    (f"Here is my final created question: {Q}", "no 'FINAL CREATED QUESTION:' field"),
])
def test_question_reply_errors(reply, reason):
    with pytest.raises(ParseError, match=re.escape(reason)):
        parse_question_reply(reply)


@pytest.mark.parametrize("reply, style, answer", [
    ("12 * 3 = 36.\nFINAL ANSWER: 36\nThe answer is: 36", "gsm8k", "36"),
    ("12 * 3 = 36.\n**Final Answer:** $36$.\nThe answer is: 36.", "gsm8k", "36"),
    ("cost 1200.\nFINAL ANSWER: $1,200 dollars\nThe answer is: 1200", "gsm8k", "1200"),
    ("half.\nfinal answer: 0.50\nthe answer is 0.5", "gsm8k", "0.50"),
    ("neg.\nFINAL ANSWER: -7\nThe answer is: -7", "gsm8k", "-7"),
    ("only one line.\nThe answer is: 8", "gsm8k", "8"),
    ("x.\nFINAL ANSWER: \\boxed{\\frac{1}{2}}\nThe answer is: $\\dfrac{1}{2}$", "math", "\\frac{1}{2}"),
    ("x.\nFINAL ANSWER: $(1, -\\sqrt{3})$\nThe answer is: (1, -\\sqrt{3})", "math", "(1, -\\sqrt{3})"),
    ("x.\nFINAL ANSWER: \\boxed{2}+\\boxed{3}\nThe answer is: \\boxed{2}+\\boxed{3}", "math", "\\boxed{2}+\\boxed{3}"),
])
def test_answer_reply(reply, style, answer):
    solution, got = parse_answer_reply(reply, style)
    assert got == answer
    assert solution.endswith(f"\nThe answer is: {answer}")
    assert solution.count("answer is") == 1 and "FINAL ANSWER" not in solution.upper()
    assert solution.startswith(reply.split("\n")[0])


@pytest.mark.parametrize("reply, style, reason", [
    ("", "gsm8k", "empty reply"),
    ("It is 36 I think.", "gsm8k", "no 'FINAL ANSWER:'"),
    ("steps\nFINAL ANSWER: 36\nThe answer is: 37", "gsm8k", "disagree"),
    ("steps\nFINAL ANSWER: 3 + 4\nThe answer is: 3 + 4", "gsm8k", "not a single number"),
    ("steps\nFINAL ANSWER: many\nThe answer is: many", "gsm8k", "not a single number"),
    ("FINAL ANSWER: 4\nThe answer is: 4", "gsm8k", "no solution steps"),
])
def test_answer_reply_errors(reply, style, reason):
    with pytest.raises(ParseError, match=reason):
        parse_answer_reply(reply, style)


@pytest.mark.parametrize("a, b", [
    ("36", "36.0"), ("1,200", "1200"), ("$1{,}200$", "1200"), ("0.50", ".5"), ("\\boxed{7}", "7"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left( 1, 2 \\right)", "(1,2)"), ("5\\text{ cm}", "5 cm"), ("-0", "0"),
    ("007", "7"), ("X = 3", "x=3"),
])
def test_normalise_answer_equal(a, b):
    assert normalise_answer(a) == normalise_answer(b)


@pytest.mark.parametrize("a, b", [("36", "37"), ("0.5", "5"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("(1,2)", "[1,2]"),
                                  ("-3", "3"), ("1200", "120")])
def test_normalise_answer_different(a, b):
    assert normalise_answer(a) != normalise_answer(b)


def test_load_problems_formats_and_ids(tmp_path):
    f = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "GSM q?", "answer": "1+1=2\n#### 2"},
        {"problem": "Find $x$.", "solution": "$\\boxed{3}$", "level": "Level 1", "unique_id": "test/alg/1.json"},
        {"question": "Own q?", "solution": "s. The answer is: 4", "answer": "4", "id": 17},
        {"question": "Own latex $x^2$?", "solution": "s", "answer": "4"},
        {"question": "Own fraction?", "solution": "s", "answer": "\\frac{1}{2}"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    probs = load_problems(f)
    assert [(p.id, p.style) for p in probs] == [("mixed.jsonl:1", "gsm8k"), ("test/alg/1.json", "math"),
                                                 ("17", "gsm8k"), ("mixed.jsonl:5", "math"), ("mixed.jsonl:6", "math")]
    assert probs[1].question == "Find $x$."


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n', ":2: not valid JSON"),
    ('{"question": "a", "answer": "no hashes"}\n', ":1: unknown problem record"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('{"question": "  ", "answer": "#### 1"}\n', ":1: the question is empty"),
    ("\n\n", ": no problems in the file"),
])
def test_load_problems_errors_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{f}{message}")):
        load_problems(f)


def test_prompts():
    seed = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    for style in ("gsm8k", "math"):
        q = question_messages(seed, style)
        assert q[0]["role"] == "user" and q[0]["content"].rstrip().endswith(seed)
        for field in ("CREATED QUESTION:", "VERIFICATION AND MODIFICATION:", "FINAL CREATED QUESTION:"):
            assert field in q[0]["content"]
        a = answer_messages(seed, style)[0]["content"]
        assert "FINAL ANSWER: X" in a and "The answer is: X" in a and a.rstrip().endswith(seed)
    assert "single number" in question_messages(seed, "gsm8k")[0]["content"]
    assert "LaTeX" in question_messages(seed, "math")[0]["content"]
    assert re.fullmatch(r"[0-9a-f]{12}", prompt_version())
    with pytest.raises(ValueError, match="unknown style"):
        question_messages(seed, "gsm9k")


def test_prices():
    assert model_price("gpt-4-turbo") == (10.0, 30.0)
    assert model_price("gpt-4-turbo-2024-04-09") == (10.0, 30.0)
    assert model_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)  # longest prefix, not gpt-4o
    assert model_price("gpt-4o") == (2.50, 10.00)
    assert model_price("gpt-3.5-turbo-0125") == (0.50, 1.50)
    assert model_price("gpt-4-turbo", price_out=12.0) == (10.0, 12.0)
    assert model_price("llama-70b") is None and model_price("llama-70b", 1.0) is None
    assert model_price("llama-70b", 1.0, 2.0) == (1.0, 2.0)


def test_item_plan_is_a_deterministic_shuffle_per_epoch():
    n = 7
    plan = ItemPlan(n, seed=3)
    items = [plan.seed_index(i) for i in range(5 * n)]
    for e in range(5):
        assert sorted(items[e * n:(e + 1) * n]) == list(range(n))  # each block uses every seed once
    assert items == [ItemPlan(n, 3).seed_index(i) for i in range(5 * n)]  # reproducible
    assert items != [ItemPlan(n, 4).seed_index(i) for i in range(5 * n)]
    assert items[:n] != items[n:2 * n]  # reshuffled per epoch
    assert Counter(items) == {s: 5 for s in range(n)}


def test_output_paths():
    p = output_paths(Path("d/synth.jsonl"))
    assert [str(p[k]) for k in ("records", "journal", "rejects", "report")] == [
        "d/synth.jsonl", "d/synth.journal.jsonl", "d/synth.rejects.jsonl", "d/synth.report.json"]


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
def test_real_gsm8k_solutions_parse_to_their_reference_answers():
    """Every GSM8K test solution, rewritten into the answer-reply format, parses back to its '#### N' answer."""
    probs = load_problems(DATA / "gsm8k_test.jsonl")
    rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    assert len(probs) == len(rows) == 1319 and {p.style for p in probs} == {"gsm8k"}
    for row in rows:
        body, ref = row["answer"].split("####")
        ref = ref.strip().replace(",", "")
        reply = f"{body.strip()}\nFINAL ANSWER: {ref}\nThe answer is: {ref}"
        solution, answer = parse_answer_reply(reply, "gsm8k")
        assert answer == ref and float(answer) == float(ref)
        assert solution == f"{body.strip()}\nThe answer is: {ref}"
    assert {p.style for p in load_problems(DATA / "math_test_1000.jsonl")} == {"math"}
