"""Exact resume: a run killed after some step (SIGKILL, or SIGTERM which saves first) and resumed has
bitwise the same per-step losses (CPU fp32) and final weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmath import data as D
from fastmath import train as T
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, generate
from fastmath.tokenizer import train_tokenizer

STEPS = 14


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    recs = generate(300, SMALL_CONFIG, seed=9)
    tok = root / "tok.model"
    train_tokenizer([D.render_prompt(r["question"]) for r in recs] + [r["solution"] for r in recs], tok, 400)
    cfg = {"model": "test", "tokenizer": str(tok), "procedural": SMALL_SPEC, "procedural_examples": 400, "val_examples": 8, "eval_problems": 0,
           "micro_batch_tokens": 1024, "batch_tokens": 2048, "max_steps": STEPS, "threads": 1, "progress": False}
    ref = T.train(T.TrainConfig(out=str(root / "ref"), **cfg))
    return root, cfg, Path(ref["run_dir"])


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, "a step is logged once even across a resume"
            out[rec["step"]] = rec["loss"]
    return out


def start(cfg: dict, out: Path) -> tuple[subprocess.Popen, Path]:
    args = [sys.executable, "-m", "fastmath.cli", "train", "--out", str(out), "--no-progress"]
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        args += [flag if v is not False else "--no-" + k.replace("_", "-")] + ([] if isinstance(v, bool) else [str(v)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env), out


def wait_for_step(out: Path, k: int, proc, timeout=120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "latest" / "metrics.jsonl"
        if m.exists() and sum('"loss"' in line for line in m.read_text().splitlines()) >= k:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise AssertionError("run did not reach the step in time")


def same_weights(a: Path, b: Path) -> None:
    from fastmath.checkpoint import load_model

    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_exactly(setup, sig):
    root, cfg, ref_dir = setup
    out = root / sig.name
    proc, out = start({**cfg, "save_every": 3 if sig == signal.SIGKILL else 0}, out)
    wait_for_step(out, 4, proc)
    proc.send_signal(sig)
    text = proc.communicate(timeout=120)[0]
    run = (out / "latest").resolve()
    ckpts = T.list_checkpoints(run)
    if sig == signal.SIGTERM:  # saved at the end of the step in progress, then exited cleanly
        assert proc.returncode == 0 and "stopped by signal" in text, text
        assert ckpts and ckpts[-1][0] >= 4
    else:
        assert proc.returncode == -signal.SIGKILL and ckpts and ckpts[-1][0] % 3 == 0
    assert ckpts[-1][0] < STEPS, "the run must have been interrupted before its end"
    assert not (run / "final").exists()

    T.train(T.TrainConfig(), resume=str(run))  # the saved config is used
    ref, got = losses(ref_dir), losses(run)
    assert list(got) == list(range(1, STEPS + 1))
    assert got == ref, "per-step losses must be bitwise equal to the uninterrupted run"
    same_weights(ref_dir / "final", run / "final")
