"""Helpers for the `fastmath serve` tests: a tiny random checkpoint and a real server subprocess on 127.0.0.1."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fastmath.checkpoint import save_checkpoint
from fastmath.config import get_preset
from fastmath.model import Transformer
from fastmath.serve.process import ServeProcess
from fastmath.synth.procedural import SMALL_CONFIG, generate
from fastmath.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(root: Path, max_seq_len: int = 1024) -> Path:
    """The `test` preset with random weights (std 0.2: clear greedy margins) and a 400-token tokenizer."""
    recs = generate(300, SMALL_CONFIG)
    tok = train_tokenizer([r["question"] + "\n" + r["solution"] for r in recs], root / "tok.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(get_preset("test").replace(vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    model.init_weights(0.2)
    save_checkpoint(model, root / "ckpt", tokenizer_path=tok.path)
    return root / "ckpt"


def http(method: str, url: str, body=None, headers=None, timeout: float = 60.0):
    """(status, parsed JSON or text) without any client library's own checks."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


class Server(ServeProcess):
    """`fastmath serve` of `model_dir` in a subprocess (one thread); `stop()` sends SIGTERM and waits."""

    def __init__(self, model_dir: Path, *args: str, log_path: Path | None = None):
        port_log = log_path or Path(model_dir).parent / f"serve-{os.getpid()}-{time.monotonic_ns()}.log"
        super().__init__(model_dir, *args, log_path=port_log, start_timeout=180, cwd=REPO)

    def metrics(self) -> dict:
        """{name: value} of /metrics (labels dropped)."""
        _, text = http("GET", self.url + "/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out

    def stop(self) -> int:
        super().stop()
        return self.proc.returncode
