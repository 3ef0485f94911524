"""`fastmath sample`: defaults (runs/latest, built-in held-out set), outputs valid against the grading schemas,
resume after a crash reproduces the uninterrupted run, argument mismatch and bad inputs are clear errors,
and the torchrun sharding/merge logic."""
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fastmath import metrics
from fastmath import sample_io as io
from fastmath.checkpoint import save_checkpoint
from fastmath.cli import main
from fastmath.config import get_preset
from fastmath.model import Transformer
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

ARGS = ["--n", "3", "--problems", "3", "--max-new-tokens", "12", "--greedy"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fake training run: runs/<ts>/final (test preset, random weights) + config.json, runs/latest."""
    root = tmp_path_factory.mktemp("work")
    recs = generate(300, SMALL_CONFIG)
    tok = train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], root / "tok.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size))
    model.init_weights(0.2)
    run = root / "runs" / "20240101-000000"
    save_checkpoint(model, run / "final", tokenizer_path=tok.path)
    (run / "config.json").write_text(json.dumps({"config": {"template": "plain", "procedural": SMALL_SPEC, "seed": 0}}))
    (root / "runs" / "latest").symlink_to(run.name)
    return root


def invoke(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["sample", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_defaults_outputs_resume_and_mismatch(runs, tmp_path):
    res = invoke(ARGS, runs)
    assert res.exit_code == 0, res.output
    out = runs / "runs" / "latest" / "eval"  # default --out: eval/ in the run directory
    lines = (out / "samples.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["index"] for r in recs] == [0, 1, 2] and all(len(r["completions"]) == 3 for r in recs)
    for r in recs:
        metrics.validate(r, "samples")
        assert "greedy_completion" in r and r["question"] and r["reference_answer"]
    summary = json.loads((out / "summary.json").read_text())
    metrics.validate(summary, "summary")
    assert summary["problems"] == 3 and summary["n"] == 3 and summary["greedy_accuracy"] is not None
    assert summary["generated_tokens"] == sum(sum(r["token_counts"]) + r["greedy_token_count"] for r in recs)
    assert (out / "pass_at_k.png").stat().st_size > 1000
    assert "Pass@3" in res.output and "PassRatio@3" in res.output
    # the default data is the built-in held-out procedural set
    held = generate(3, SMALL_CONFIG, split="test", unique=True)
    assert [r["question"] for r in recs] == [h["question"] for h in held]

    # crash after one problem (plus half a line): the rerun redoes only the rest, identically
    (out / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][:50])
    (out / "summary.json").unlink()
    res = invoke(ARGS, runs)
    assert res.exit_code == 0, res.output
    assert "1 of 3 problems already sampled" in res.output
    again = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in again] == [r["completions"] for r in recs]
    metrics.validate(json.loads((out / "summary.json").read_text()), "summary")

    # other arguments into the same folder: a clear error naming the difference
    res = invoke([*ARGS[:-1], "--temperature", "0.5"], runs)
    assert res.exit_code != 0 and "temperature: 0.7 there, 0.5 now" in res.output
    res = invoke(ARGS[:-1], runs)
    assert res.exit_code != 0 and "greedy" in res.output


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 3"}) + "\n" + '{"foo": 1}\n')
    res = invoke(["--data", str(bad), "--out", str(tmp_path / "o1"), *ARGS], runs)
    assert res.exit_code != 0 and f"{bad}:2: unknown record" in res.output
    res = invoke(["--model", str(tmp_path / "nope"), *ARGS], runs)
    assert res.exit_code != 0 and "no such run or checkpoint directory" in res.output
    # a prompt that cannot fit the KV budget
    res = invoke(["--out", str(tmp_path / "o2"), "--kv-cache-gb", "0.00001", *ARGS], runs)
    assert res.exit_code != 0 and "problem 2: a prompt of" in res.output and "--kv-cache-gb" in res.output
    assert "Traceback" not in res.output


def test_data_file_checkpoint_dir_and_sharded_merge(runs, tmp_path):
    data = tmp_path / "gsm.jsonl"
    probs = generate(5, SMALL_CONFIG, split="test", seed=3)
    data.write_text("".join(json.dumps({"question": p["question"], "answer": "x\n#### " + p["answer"]}) + "\n"
                            for p in probs))
    ckpt = runs / "runs" / "latest" / "final"
    full = tmp_path / "full"
    assert invoke(["--model", str(ckpt), "--data", str(data), "--out", str(full), "--n", "2",
                   "--max-new-tokens", "8"], runs).exit_code == 0
    ref = io.read_records(full / "samples.jsonl")
    assert [r["reference_answer"] for r in ref] == [p["answer"] for p in probs]
    # two ranks' shares (as torchrun would run them) merge into the same file as one process
    assert io.my_share(list(range(5)), 0, 2) == [0, 2, 4] and io.my_share(list(range(5)), 1, 2) == [1, 3]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for rank in range(2):
        with open(sharded / io.shard_name(rank, 2), "w") as f:
            for r in ref:
                if r["index"] in io.my_share(list(range(5)), rank, 2):
                    f.write(json.dumps(r) + "\n")
    merged = io.merge_shards(sharded)
    assert merged == ref and not list(sharded.glob("samples.rank*"))
    assert (sharded / "samples.jsonl").read_text() == (full / "samples.jsonl").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU process group")
def test_torchrun_two_ranks_equal_one_process(runs, tmp_path):
    """Two gloo ranks on CPU: each samples its share, rank 0 merges; samples equal the one-process run."""
    common = ["-n", "2", "--problems", "4", "--max-new-tokens", "8", "--greedy"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke([*common, "--out", str(one)], runs).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "fastmath.cli", "sample", *common, "--out", str(two)]
    proc = subprocess.run(cmd, cwd=runs, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = io.read_records(one / "samples.jsonl"), io.read_records(two / "samples.jsonl")
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    assert [r["greedy_completion"] for r in a] == [r["greedy_completion"] for r in b]
    assert json.loads((two / "summary.json").read_text())["problems"] == 4


def test_threads_option_sets_torch_threads(runs, tmp_path):
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        res = invoke(["--out", str(tmp_path / "t"), "--threads", str(target), *ARGS], runs)
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)
    assert invoke(["--threads", "-1", *ARGS], runs).exit_code != 0  # a clear usage error


def test_missing_matplotlib_and_jsonschema_skip_plot_and_self_check(runs, tmp_path, monkeypatch):
    """A --no-deps install (the GPU machine has neither) still samples, grades and writes summary.json."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    res = invoke(["--out", str(tmp_path / "m"), *ARGS], runs)
    assert res.exit_code == 0, res.output
    assert "pass_at_k.png skipped" in res.output and "without a schema check" in res.output
    assert (tmp_path / "m" / "summary.json").is_file() and not (tmp_path / "m" / "pass_at_k.png").exists()
