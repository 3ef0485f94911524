"""`fastmath serve` in a child process on 127.0.0.1 and a free port (for benchmarks, tests and the paper miniature).

    with ServeProcess(run_dir, "--served-model-name", "teacher", log_path=work / "serve.log") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")

Starts the server, waits for `/health`, and on `stop()` (or leaving the `with`) sends SIGTERM so in-flight requests
finish, killing it after `stop_timeout` seconds. Standard library only: importing it pulls in neither torch nor
FastAPI.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m fastmath.cli serve --model MODEL --port P --threads T --log-level warning *args`, output to log_path."""

    def __init__(self, model: str | os.PathLike, *args: str, log_path: str | os.PathLike, threads: int = 1,
                 omp_threads: int | None = None, start_timeout: float = 300.0, stop_timeout: float = 60.0,
                 cwd: str | os.PathLike | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = Path(log_path)
        self.stop_timeout = stop_timeout
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads or threads), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastmath.cli", "serve", "--model", str(model), "--port", str(self.port),
             "--threads", str(threads), "--log-level", "warning", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"fastmath serve exited ({self.proc.returncode}); see {self.log_path}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"fastmath serve did not become healthy in {start_timeout:.0f} s; see "
                                   f"{self.log_path}:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        """Everything the server has written so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (the server drains in-flight requests), then kill after `stop_timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
