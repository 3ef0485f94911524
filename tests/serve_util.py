"""Helpers for the `fastmath serve` tests: a tiny random checkpoint and a real server subprocess on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fastmath.checkpoint import save_checkpoint
from fastmath.config import get_preset
from fastmath.model import Transformer
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Server:
    """`fastmath serve` in a subprocess; `stop()` sends SIGTERM and waits (kill after `timeout`)."""

    def __init__(self, model_dir: Path, *args: str, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = log_path or Path(model_dir).parent / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastmath.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--threads", "1", "--log-level", "warning", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastmath serve exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if http("GET", self.url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"fastmath serve did not become healthy:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        """{name: value} of /metrics (labels dropped)."""
        _, text = http("GET", self.url + "/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
