"""`fastmath grade`: re-grades fastmath's own samples.jsonl and other engines' files, reports malformed
lines by number, writes a summary valid against the schema and equal to summarize() on the same data."""
import json

from click.testing import CliRunner

from fastmath.commands.grade import command
from fastmath.metrics import problem_record, summarize, validate


def _own_file(tmp_path):
    recs = [
        problem_record(0, "1+1?", "2", ["The answer is: 2", "The answer is 3", "The answer is: 2"], [4, 5, 6],
                       greedy_completion="The answer is: 2", greedy_token_count=4, type="Arith", level="Level 1"),
        problem_record(1, "half?", "\\frac12", ["The answer is 0.5", "no idea", "The answer is: 2"], [7, 8, 9],
                       greedy_completion="The answer is: 1", greedy_token_count=3, type="Frac", level="Level 2"),
    ]
    for r in recs:
        validate(r, "samples")
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def test_regrade_own_samples(tmp_path):
    path, recs = _own_file(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"seconds": 10.0, "model": "m"}))  # a previous run
    result = CliRunner().invoke(command, [str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    validate(summary, "summary")
    expected = summarize(recs, seconds=10.0)
    for key in ("n", "problems", "pass_at_k", "pass_ratio", "majority_accuracy", "greedy_accuracy",
                "generated_tokens", "tokens_per_second", "breakdowns"):
        assert summary[key] == expected[key], key
    assert summary["greedy_accuracy"] == 0.5 and summary["generated_tokens"] == 39 + 7
    assert summary["model"] == "m"  # settings of the sampling run are kept
    assert "pass@1" in result.output and "passratio@3" in result.output


def test_other_engine_and_malformed_lines(tmp_path):
    lines = [
        json.dumps({"problem": "p", "solution": "So $x=\\boxed{\\frac{3}{4}}$.",
                    "responses": [{"text": "The answer is 0.75"}, {"text": "\\boxed{3/4}"}, {"text": "The answer is 1"}]}),
        "{not json",
        json.dumps({"question": "q", "answer": "work\n#### 1,200", "outputs": ["The answer is 1200", "#### 1,200"]}),
        json.dumps({"question": "q", "outputs": ["x"]}),
        json.dumps(["a list"]),
        "",
        json.dumps({"question": "q", "gt": 5, "outputs": []}),
        json.dumps({"question": "q", "gt": 5, "outputs": ["5"], "num_tokens": [1, 2]}),
    ]
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "res" / "s.json"
    result = CliRunner().invoke(command, [str(path), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    for lineno in (2, 4, 5, 7, 8):
        assert f"other.jsonl:{lineno}:" in result.output
    assert "other.jsonl:1:" not in result.output and "other.jsonl:3:" not in result.output
    summary = json.loads(out.read_text())
    validate(summary, "summary")
    assert summary["problems"] == 2 and summary["n"] == 2
    assert summary["malformed_lines"] == [2, 4, 5, 7, 8]
    # problem 1: 2 of 3 correct; problem 2: 2 of 2
    assert summary["pass_ratio"] == (2 / 3 + 1) / 2
    assert summary["seconds"] is None and summary["tokens_per_second"] is None


def test_nothing_gradable_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("garbage\n")
    result = CliRunner().invoke(command, [str(path)])
    assert result.exit_code != 0
    assert "no gradable lines" in result.output


def test_extract_modes(tmp_path):
    # completions without a marked answer: strict misses them (and hints at flexible), flexible grades them
    lines = [json.dumps({"question": "q", "answer": "7", "outputs": ["3 + 4 gives 7 in total.", "so the result is 8",
                                                                  "The answer is: 7"]}),
             json.dumps({"question": "q", "answer": "\\frac34", "outputs": ["which gives $\\frac{3}{4}$.",
                                                                          "#### 0.75", "I am not sure"]})]
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summaries = {}
    for mode in ("strict", "flexible"):
        out = tmp_path / f"{mode}.json"
        args = [str(path), "--out", str(out), "--workers", "1"] + (["--extract", mode] if mode != "strict" else [])
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0, result.output
        summaries[mode] = s = json.loads(out.read_text())
        validate(s, "summary")
        assert s["extract"] == mode
        assert ("--extract flexible" in result.output) == (mode == "strict")  # 4 of 6 missing > 20%
    assert summaries["strict"]["no_answer_rate"] == 4 / 6 and summaries["strict"]["pass_ratio"] == 1 / 3
    assert summaries["flexible"]["no_answer_rate"] == 1 / 6 and summaries["flexible"]["pass_ratio"] == 2 / 3
    bad = CliRunner().invoke(command, [str(path), "--extract", "loose"])
    assert bad.exit_code != 0 and "loose" in bad.output
