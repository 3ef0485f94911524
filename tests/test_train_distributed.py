"""FSDP2 on CPU (gloo): 2 processes follow the loss trajectory of 1 process with the same global batch,
export one HF-layout final/, and resume from a distributed checkpoint exactly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmath import data as D
from fastmath import train as T
from fastmath.checkpoint import load_model
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
STEPS = 6


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def torchrun(args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastmath.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_two_processes_match_one(tmp_path):
    recs = generate(300, SMALL_CONFIG, seed=9)
    tok = tmp_path / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], tok, 400)
    opts = {"model": "test", "tokenizer": str(tok), "procedural": SMALL_SPEC, "procedural_examples": 300, "val_examples": 8,
            "eval_problems": 4, "eval_max_new_tokens": 8, "micro_batch_tokens": 1024, "batch_tokens": 2048,
            "max_steps": STEPS, "save_every": 3, "keep": 5, "threads": 1, "progress": False}
    one = T.train(T.TrainConfig(out=str(tmp_path / "one"), **opts))  # 1 process: 2 micro-batches per step

    args = ["--out", str(tmp_path / "two"), "--no-progress"]
    for k, v in opts.items():
        if k != "progress":
            args += ["--" + k.replace("_", "-"), str(v)]
    torchrun(args, tmp_path)  # 2 processes: 1 micro-batch each per step
    two = (tmp_path / "two" / "latest").resolve()
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["accum"] == 1
    l1, l2 = losses(Path(one["run_dir"])), losses(two)
    assert len(l1) == len(l2) == STEPS
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=2e-5, atol=1e-6)
    w1 = load_model(Path(one["run_dir"]) / "final").state_dict()
    w2 = load_model(two / "final").state_dict()  # one HF-layout export gathered from the shards
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-4, atol=1e-5)
    acc = json.loads((two / "summary.json").read_text())["greedy_acc"]
    assert 0 <= acc <= 1

    # Resume from the distributed checkpoint at step 3 (later state removed) and redo steps 4-6.
    again = tmp_path / "again"
    shutil.copytree(two, again, symlinks=True)
    shutil.rmtree(again / "checkpoints" / f"step_{STEPS}")
    shutil.rmtree(again / "final")
    assert [s for s, _ in T.list_checkpoints(again)] == [3]
    out = torchrun(["--resume", str(again)], tmp_path)
    assert "resuming" in out and "from step 3" in out
    assert losses(again) == losses(two)


def test_tied_embeddings_stay_one_parameter_under_fsdp(tmp_path):
    """A tied model (LLaMA-3.2 1B / Qwen2.5 <= 3B style): FSDP2 keeps embed_tokens and lm_head one parameter (both in
    the root unit), so 2 processes follow 1 process's losses and weights; final/ stores the weight once and
    reopens in transformers with fastmath's logits."""
    from safetensors import safe_open

    from fastmath.checkpoint import save_checkpoint
    from fastmath.config import get_preset
    from fastmath.model import Transformer
    from fastmath.tokenizer import Tokenizer

    recs = generate(120, seed=9)
    tok = tmp_path / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], tok, 400)
    torch.manual_seed(0)
    base = Transformer(get_preset("test").replace(vocab_size=Tokenizer(tok).vocab_size, tie_embeddings=True))
    save_checkpoint(base, tmp_path / "base", tokenizer_path=tok)
    steps = 3
    opts = {"model": str(tmp_path / "base"), "procedural_examples": 120, "val_examples": 4, "eval_problems": 0,
            "micro_batch_tokens": 1024, "batch_tokens": 2048, "max_steps": steps, "lr": 3e-3, "warmup": 0.0,
            "threads": 1, "progress": False}
    one = Path(T.train(T.TrainConfig(out=str(tmp_path / "one"), **opts))["run_dir"])
    args = ["--out", str(tmp_path / "two"), "--no-progress"]
    for k, v in opts.items():
        if k != "progress":
            args += ["--" + k.replace("_", "-"), str(v)]
    torchrun(args, tmp_path)
    two = (tmp_path / "two" / "latest").resolve()
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == steps
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=2e-5, atol=1e-6)
    m1, m2 = load_model(one / "final"), load_model(two / "final")
    assert m2.lm_head.weight is m2.embed_tokens.weight
    w1, w2 = m1.state_dict(), m2.state_dict()
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-4, atol=1e-5)
    assert (w2["embed_tokens.weight"] - base.embed_tokens.weight).abs().max() > 1e-3  # the tied weight trained
    with safe_open(two / "final" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(two / "final", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 33, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m2.eval()(ids), rtol=1e-4, atol=1e-4)
