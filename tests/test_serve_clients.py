"""`fastmath serve` driven by the tools users point at it, unmodified and fully offline:

- lm-evaluation-harness (`lm_eval run --model local-completions`, `tokenizer_backend=remote`, its default token-id
  requests) on two tasks this test defines over local JSONL files: a `generate_until` task whose answers must
  equal the model's own greedy decoding, and a multiple-choice task whose per-sample log-likelihoods
  (`--log_samples`) must equal an fp64 forward of the model over the same tokens within 1e-4;
- `fastmath synth --base-url http://127.0.0.1:PORT/v1` end to end against a tiny random model: its replies do not
  parse, and the run must still finish, journal every reply and report the rejects.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_util import REPO, Server, make_checkpoint  # noqa: E402
from engine_fixture import greedy_reference  # noqa: E402

from fastmath.checkpoint import load_model  # noqa: E402
from fastmath.tokenizer import Tokenizer  # noqa: E402

NAME = "tiny"
GEN = [{"question": "What is 2 plus 3?", "answer": "5"},
       {"question": "What is 10 minus 4?", "answer": "6"},
       {"question": "Tom has 5 apples and eats 2. How many are left?", "answer": "3"}]
MC = [{"question": "What is 2 plus 3?", "choices": ["5", "6", "seven"], "label": 0},
      {"question": "What is 10 minus 4?", "choices": ["4", "6", "ten apples"], "label": 1},
      {"question": "Which number is larger?", "choices": ["3", "30"], "label": 1}]
CONTEXT = "Question: {question}\nAnswer:"
MAX_GEN = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_clients"), max_seq_len=2048)  # synth prompts ~1200 tokens


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--served-model-name", NAME)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model64(ckpt):
    return load_model(ckpt).double().eval()


def _write_tasks(d: Path):
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN))
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    text = CONTEXT.replace("{question}", "{{question}}").replace("\n", "\\n")
    (d / "fm_gen.yaml").write_text(f"""task: fm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{text}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    (d / "fm_mc.yaml").write_text(f"""task: fm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = list(out.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])


def test_lm_eval_local_completions_generate_until_and_multiple_choice(server, model64, ckpt, tmp_path):
    _write_tasks(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    res = subprocess.run(
        [str(lm_eval), "run", "--model", "local-completions", "--model_args",
         f"model={NAME},base_url={server.base_url}/completions,tokenizer_backend=remote,max_length=2048,"
         "num_concurrent=2,max_retries=1",
         "--tasks", "fm_gen", "fm_mc", "--include_path", str(tmp_path), "--log_samples",
         "--output_path", str(tmp_path / "out")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    tok = Tokenizer(ckpt)

    def logprobs(ids):  # (L-1, V) fp64 log-probs of each next token
        with torch.no_grad():
            return torch.log_softmax(model64(torch.tensor([ids]))[0, :-1], -1)

    # generate_until: lm-eval sends the context's token ids (no BOS) with stop ["\n", "</s>"] at temperature 0
    for rec, sample in zip(GEN, _samples(tmp_path / "out", "fm_gen")):
        ctx = tok.encode(CONTEXT.format(**rec), bos=False)
        ref = greedy_reference(model64, ctx, MAX_GEN, tok.eos_id)
        text = tok.decode([t for t in ref if t != tok.eos_id]).split("\n")[0]
        assert sample["resps"][0][0] == text

    # multiple choice: lm-eval's own split of context + continuation into tokens, scored by fastmath in fp64
    checked = 0
    for rec, sample in zip(MC, _samples(tmp_path / "out", "fm_mc")):
        context = CONTEXT.format(**rec)
        for choice, resp in zip(rec["choices"], sample["resps"]):
            whole = tok.encode(context + " " + choice, bos=False)
            n_ctx = len(tok.encode(context, bos=False))
            lp = logprobs(whole)
            ll = sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
            greedy = all(int(lp[i - 1].argmax()) == whole[i] for i in range(n_ctx, len(whole)))
            got_ll, got_greedy = resp[0]
            assert abs(float(got_ll) - ll) < 1e-4, (context, choice, got_ll, ll)
            assert (got_greedy == "True") == greedy
            checked += 1
    assert checked == sum(len(r["choices"]) for r in MC)


def test_fastmath_synth_runs_end_to_end_against_fastmath_serve(server, tmp_path, monkeypatch):
    from fastmath.commands.synth import command
    from fastmath.synth.pipeline import output_paths

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": f"Ann has {i + 3} apples and buys {i + 1} more. How many "
                                                     f"apples does Ann have?", "answer": f"#### {2 * i + 4}"}) + "\n"
                             for i in range(4)))
    out = tmp_path / "synth.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "local")  # any non-empty value for a local server
    before = server.metrics()["fastmath:requests_total"]
    res = CliRunner().invoke(command, ["--seeds", str(seeds), "--out", str(out), "--num-questions", "2",
                                       "--model", NAME, "--base-url", server.base_url, "--concurrency", "4",
                                       "--max-tokens", "48", "--max-parse-retries", "1", "--max-items", "4",
                                       "--timeout", "120", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    paths = output_paths(out)
    report = json.loads(paths["report"].read_text())
    journal = [json.loads(line) for line in paths["journal"].read_text().splitlines()[1:]]  # after the header
    served = server.metrics()["fastmath:requests_total"] - before
    # every reply the server gave is in the journal, and the report counts them
    assert len(journal) == served == report["usage"]["requests"] > 0
    assert all(e["model"] == NAME and e["id"].startswith("chatcmpl-") and e["completion_tokens"] <= 48
               for e in journal)
    assert sum(e["completion_tokens"] for e in journal) == report["usage"]["completion_tokens"]
    rejects = [json.loads(line) for line in paths["rejects"].read_text().splitlines()] \
        if paths["rejects"].exists() else []
    assert len(rejects) == report["rejected_replies"]["question"] + report["rejected_replies"]["answer"] > 0
    kept = out.read_text().splitlines() if out.exists() else []
    assert len(kept) == report["kept"]
    assert f"records   {report['kept']} / 2" in res.output and "rejects" in res.output
