"""`fastmath sample` writes the same samples as before the engine split (issue 14 item 3): the fixture in
tests/data/sample_fixture.json was written by the pre-split sampler (commit eb6ff54) from the model, tokenizer
and prompts that tests/engine_fixture.py rebuilds from seeds."""
import json

import torch
from engine_fixture import FIXTURE, produce


def test_samples_equal_the_pre_split_fixture_on_one_thread(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: faster, and immune to OpenMP waits on shared cores
    try:
        _check(tmp_path)
    finally:
        torch.set_num_threads(n)


def _check(tmp_path):
    want = json.loads(FIXTURE.read_text())
    got = produce(tmp_path)
    assert got["eval_args"] == want["eval_args"]
    assert got["samples_jsonl"] == want["samples_jsonl"]  # samples.jsonl: texts, counts, reasons, greedy
    assert got["sampler_run"] == want["sampler_run"]  # Sampler.run: token ids, texts and reasons
