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
