"""`fastmath sample` writes the same samples as before the engine split (issue 14 item 3): the fixture in
tests/data/sample_fixture.json was written by the pre-split sampler (commit eb6ff54) from the model, tokenizer
and prompts that tests/engine_fixture.py rebuilds from seeds."""
import json

from engine_fixture import FIXTURE, produce


def test_samples_equal_the_pre_split_fixture(tmp_path):
    want = json.loads(FIXTURE.read_text())
    got = produce(tmp_path)
    assert got["eval_args"] == want["eval_args"]
    assert got["samples_jsonl"] == want["samples_jsonl"]  # samples.jsonl: texts, counts, reasons, greedy
    assert got["sampler_run"] == want["sampler_run"]  # Sampler.run: token ids, texts and reasons
