"""Trainer: loss normalisation against a plain PyTorch reference, schedule, run directory, CLI, NaN stop."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fastmath import data as D
from fastmath import train as T
from fastmath.commands.train import command
from fastmath.config import get_preset
from fastmath.distributed import Dist
from fastmath.model import Transformer
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

SMALL = ["--model", "test", "--procedural", SMALL_SPEC, "--procedural-examples", "300", "--val-examples", "16", "--eval-problems", "8",
         "--eval-max-new-tokens", "24", "--micro-batch-tokens", "1024", "--batch-tokens", "2048",
         "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    recs = generate(300, SMALL_CONFIG, seed=9)
    texts = [D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs]
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer(texts, path, vocab_size=400)
    return path


def test_lr_schedule():
    cfg = T.TrainConfig(lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    total = 100
    lrs = [T.lr_at(s, total, cfg) for s in range(total)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    for s in range(10, total):  # cosine from the peak at the end of warmup down to lr * min_lr_ratio
        expect = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
        assert lrs[s] == pytest.approx(expect)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_gradient_is_global_token_mean(tok_path):
    """Accumulated micro-batch gradients equal d/dw of (sum of target losses / targets in the global batch),
    computed by a plain per-document fp64 reference; a mean of micro-batch means would differ."""
    from fastmath.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    docs = D.tokenize_examples([D.record_to_example(r) for r in generate(40, SMALL_CONFIG, seed=1)], tok)
    stream = D.PackedStream(docs, budget=400, accum=4, seed=0)
    batches, n_total = stream.step(0)
    assert len({b.n_targets for b in batches}) > 1, "micro-batches must differ in target count for this test"
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size))
    T.accumulate_gradients(model, batches, n_total, Dist(), torch.device("cpu"), use_bf16=False)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = Transformer(model.args).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    loss = 0.0
    for pack in stream.packs_of_step(0):
        for d in pack:  # each document alone, as a (1, L) batch; labels by the definition
            ids = torch.tensor(docs.doc(d), dtype=torch.long)
            logits = ref(ids[None])[0]  # (L, V)
            targets = torch.tensor(D.doc_labels(docs.doc(d), docs.n_prompt[d]))
            loss = loss + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (loss / n_total).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-4, atol=1e-6)


def run_cli(args, expect_ok=True):
    res = CliRunner().invoke(command, args, catch_exceptions=False)
    if expect_ok:
        assert res.exit_code == 0, res.output
    return res


def test_run_directory_and_hf_export(tmp_path, tok_path):
    out = tmp_path / "runs"
    run_cli(SMALL + ["--max-steps", "5", "--save-every", "1", "--keep", "2", "--out", str(out), "--tokenizer", str(tok_path)])
    run = out / "latest"
    assert run.is_symlink() and (run / "config.json").is_file()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["model"] == "test" and cfg["config"]["lr"] == T.DEMO["lr"]
    assert {"torch", "fastmath", "git_commit"} <= set(cfg["versions"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [1, 2, 3, 4, 5]
    assert all(m["targets"] > 0 and m["tokens"] > m["targets"] for m in metrics if "loss" in m)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_5"]  # keep the last 2
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert (run / "loss.png").stat().st_size > 1000 and (run / "summary.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["greedy_acc"] <= 1 and summary["untrained_greedy_acc"] is not None
    step_losses = [m["loss"] for m in metrics if "loss" in m]
    assert summary["final_loss"] == step_losses[-1] and summary["final_loss_mean_steps"] == 5
    assert summary["final_loss_mean"] == pytest.approx(sum(step_losses) / 5, rel=1e-6)

    # final/ opens in transformers and gives the same logits as fastmath's model (an independent implementation)
    transformers = pytest.importorskip("transformers")
    from fastmath.checkpoint import load_model

    hf = transformers.LlamaForCausalLM.from_pretrained(run / "final", attn_implementation="eager").eval()
    ours = load_model(run / "final").eval()
    ids = torch.tensor([[1, 5, 9, 33, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    # and the final weights are the last checkpoint's
    last = load_model(run / "checkpoints" / "step_5")
    for (n, a), (_, b) in zip(ours.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), n


def test_config_file_and_cli_override(tmp_path, tok_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.005\nmax_steps: 7\nprocedural:\n  max_steps: 3\n  ops: [add, mul]\n")
    res = run_cli(SMALL + ["--config", str(yml), "--max-steps", "3", "--dry-run", "--tokenizer", str(tok_path),
                           "--out", str(tmp_path / "r")])
    assert "lr 0.005" in res.output and "; 3 steps;" in res.output  # file sets lr, command line sets steps
    n_params = get_preset("test").replace(vocab_size=400).num_params()
    assert "estimated memory per process" in res.output and f"{n_params / 1e6:.2f}M parameters" in res.output
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.004\nmax-steps = 2\ndata = "nothing.jsonl"\n')
    res = run_cli(SMALL + ["--config", str(toml), "--dry-run", "--tokenizer", str(tok_path)], expect_ok=False)
    assert res.exit_code == 1 and "nothing.jsonl: file not found" in res.output
    bad = tmp_path / "b.yaml"
    bad.write_text("learning_rate: 1\n")
    res = run_cli(["--config", str(bad), "--dry-run"], expect_ok=False)
    assert "unknown option(s) learning_rate" in res.output
    assert T.parse_procedural("min_steps=3 max_steps=4 ops=add,div").ops == ("add", "div")


def test_bad_data_is_one_clear_sentence(tmp_path, tok_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "Q", "answer": "x\\n#### 3"}\n{"question": "Q2", "answer": oops}\n')
    res = run_cli(["--data", str(f), "--tokenizer", str(tok_path), "--dry-run"], expect_ok=False)
    assert res.exit_code == 1 and f"{f}:2: malformed JSON" in res.output and "Traceback" not in res.output


def test_file_data_with_mixing_and_truncation(tmp_path, tok_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in generate(60, SMALL_CONFIG, seed=1)))
    b = tmp_path / "b.jsonl"  # GSM8K format
    b.write_text("".join(json.dumps({"question": r["question"], "answer": r["solution"].rsplit("\n", 1)[0]
                                     + "\n#### " + r["answer"]}) + "\n" for r in generate(40, SMALL_CONFIG, seed=2)))
    res = run_cli(SMALL + ["--data", str(a), "--data", str(b), "--weights", "1", "--weights", "2", "--max-len", "150",
                           "--over-length", "truncate", "--tokenizer", str(tok_path), "--val-examples", "10",
                           "--dry-run", "--cache-dir", str(tmp_path / "cache")])
    # 100 examples, 10 held out, b counted twice: 90 + (b's share of the held-out removed from it) documents
    n_docs = int(res.output.split(" training documents")[0].rsplit(" ", 1)[1])
    over = res.output.split(" documents longer than 150 tokens: ")
    n_dropped, n_truncated = (int(x.split()[0]) for x in over[1].split(", ")[:2])
    assert int(over[0].rsplit("\n", 1)[-1]) == n_dropped + n_truncated > 0
    assert 120 <= n_docs + n_dropped <= 130


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tok_path, monkeypatch):
    real = Transformer.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if k.get("labels") is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 3:  # the 4th micro-batch (step 2 with accum 2) goes bad
                return out[0] * float("nan"), out[1]
        return out

    monkeypatch.setattr(Transformer, "forward", forward)
    cfg = T.TrainConfig(model="test", procedural=SMALL_SPEC, procedural_examples=200, val_examples=8, eval_problems=0,
                        micro_batch_tokens=1024, batch_tokens=2048, max_steps=5, save_every=1, threads=1,
                        progress=False, out=str(tmp_path / "runs"), tokenizer=str(tok_path))
    with pytest.raises(T.TrainingDiverged, match=r"loss became nan at step 2.*checkpoints/step_1"):
        T.train(cfg)
    run = (tmp_path / "runs" / "latest").resolve()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]
    assert not (run / "final").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["error"] == "non-finite loss"


def test_greedy_answer_extraction():
    assert T.extract_answer("a\nThe answer is: 12.\nmore") == "12"
    assert T.extract_answer("no answer") is None
    assert T.answers_match("1,000", "1000") and not T.answers_match("12", "13")


def test_default_run_settings_are_stated():
    """The embedded default is the tiny preset on procedural problems of >= 2 steps with its own lr."""
    cfg = T.resolve_config(T.TrainConfig(), on_gpu=False, world_size=1)
    assert cfg.model == "tiny" and not cfg.data and cfg.lr == T.DEMO["lr"] and cfg.max_steps == T.DEMO["max_steps"]
    assert T.parse_procedural(cfg.procedural).min_steps >= 2
    assert cfg.template == "plain"  # the demo's prompt; a run on --data keeps the paper's Vicuna prompt
    finetune = T.resolve_config(T.TrainConfig(model=str(Path(__file__).parent), data=["x.jsonl"]), False, 1)
    assert np.isclose(finetune.lr, 2e-5) and finetune.template == "vicuna"
    assert T.resolve_config(T.TrainConfig(template="vicuna"), False, 1).template == "vicuna"  # given: kept


def test_dry_run_of_7b_allocates_no_weights(tmp_path):
    """--dry-run reports a 7B model's size and memory from its shape alone (it once built it: 27 GB)."""
    import resource
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastmath.cli", "train", "--model", "llama2-7b", "--dry-run",
                          "--no-progress", "--out", str(tmp_path), "--procedural-examples", "300",
                          "--cache-dir", ""], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "32 layers, dim 4096" in text and "estimated memory per process" in text
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 6 * 2**20  # KiB: under 6 GiB (the weights alone are 27 GB)


def test_missing_matplotlib_skips_the_plot_only(tmp_path, tok_path, monkeypatch):
    """A --no-deps install without matplotlib still finishes the run and writes summary.json."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "runs"
    res = run_cli(SMALL + ["--max-steps", "2", "--eval-problems", "2", "--out", str(out), "--tokenizer", str(tok_path)])
    assert "loss.png skipped" in res.output
    assert (out / "latest" / "summary.json").is_file() and not (out / "latest" / "loss.png").exists()


def test_compile_trains_like_eager(tmp_path, tok_path):
    """--compile (torch.compile of each block; inductor's C++ backend on the CPU) gives eager's losses."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"runs_{compiled}"
        run_cli(SMALL + ["--max-steps", "3", "--eval-problems", "0", "--out", str(out), "--tokenizer", str(tok_path)]
                + (["--compile"] if compiled else []))
        metrics = [json.loads(line) for line in (out / "latest" / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
