"""`fastmath serve` under load: K concurrent clients against the server vs the same work through the offline engine.

A trained demo model (the `tiny` preset trained briefly on procedural problems with the trainer's Python API, as
bench/sampler.py does; or --model DIR) answers held-out procedural problems. The work: K clients (default 32), each
sending R requests one after another (default 2), every request a different problem with n=8 samples, a seed, and
the prompt as token ids (the run's template, exactly as `fastmath sample` encodes it). Seeds and prompts fix every
sample, so the offline engine (in this process, the same Engine settings, all requests added at once) must produce
the same tokens; the bench checks that the two runs generated the same number of tokens.

Three runs, in one process, on the same weights and --threads:
1. offline: Engine.add_request for every request, step() until done: generated tokens/s.
2. served: `fastmath serve` in a subprocess, K asyncio clients (httpx) over HTTP: generated tokens/s (wall time from
   the first request to the last answer), p50/p99 request latency, lost requests (no 200, or a wrong choice count).
3. served with kills: the same clients, plus C client processes that stream a long request and are SIGKILLed after
   their first chunk; afterwards /metrics must show every killed request aborted and no slot in use.

Writes bench/results/serve_cpu.json (or $FASTMATH_BENCH_OUT), naming hardware, versions, settings, load and date.
Example: python bench/serve.py --threads 1   (about 3-5 minutes on 2 cores, training included)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last, not first: the repo's kernels/ must not shadow the `kernels` package

from fastmath.serve.process import ServeProcess  # noqa: E402


def env_info(threads: int) -> dict:
    import fastapi
    import uvicorn

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "loadavg_start": os.getloadavg()}


def train_tiny(work: Path, steps: int) -> Path:
    """The demo model: `tiny` trained briefly on procedural problems (answers stop at varied lengths)."""
    from fastmath.synth.procedural import SMALL_SPEC
    from fastmath.train import TrainConfig, train

    t0 = time.time()
    # small batches at a high rate: a couple of CPU minutes, enough to learn the answer format and to stop at
    # varied lengths (which is what makes continuous batching matter)
    s = train(TrainConfig(model="tiny", max_steps=steps, out=str(work / "runs_tiny"), procedural=SMALL_SPEC, procedural_examples=6000,
                          val_examples=20, eval_problems=0, batch_tokens=4096, micro_batch_tokens=4096,
                          save_minutes=0, progress=False, device="cpu", lr=3e-3, warmup=0.05), log=lambda *a: None)
    print(f"trained tiny for {steps} steps in {time.time() - t0:.0f}s (val loss {s.get('val_loss', float('nan')):.3f})",
          flush=True)
    return Path(s["run_dir"]) / "final"


def workload(ckpt: Path, a) -> tuple[list[list[int]], str]:
    from fastmath.data import encode_prompt
    from fastmath.sample_io import run_config
    from fastmath.synth.procedural import SMALL_CONFIG, heldout_set
    from fastmath.tokenizer import Tokenizer

    template = run_config(ckpt.parent).get("template") or "vicuna"
    tok = Tokenizer(ckpt)
    problems = heldout_set(a.clients * a.requests, SMALL_CONFIG)
    return [encode_prompt(tok, p["question"], template) for p in problems], template


def request_body(prompt: list[int], i: int, a) -> dict:
    return {"model": "demo", "prompt": prompt, "n": a.n, "max_tokens": a.max_tokens, "temperature": a.temperature,
            "seed": i, "stop_at_answer": True}


# ----------------------------------------------------------------------------------------------------------
# 1. offline


def run_offline(ckpt: Path, prompts, a) -> dict:
    from fastmath.checkpoint import load_model
    from fastmath.engine import Engine, SamplingParams
    from fastmath.tokenizer import Tokenizer

    model = load_model(ckpt, device="cpu", dtype=torch.float32)
    tok = Tokenizer(ckpt)
    engine = Engine(model, tok, max_slots=a.max_slots, max_model_len=a.max_model_len)

    def run(items):
        for rid, p, seed in items:
            engine.add_request(rid, p, SamplingParams(n=a.n, temperature=a.temperature, max_new_tokens=a.max_tokens,
                                                      seed=seed, stop_at_answer=True))
        done = 0
        while engine.has_unfinished():
            done += sum(len(s.token_ids) for o in engine.step() for s in o.outputs if s.finished)
        return done

    run([("warmup", prompts[0], 10**6)])
    t0 = time.perf_counter()
    tokens = run([(f"r{i}", p, i) for i, p in enumerate(prompts)])
    dt = time.perf_counter() - t0
    return {"generated_tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "slots": engine.plan.n_slots}


# ----------------------------------------------------------------------------------------------------------
# 2 and 3. served


class Served(ServeProcess):
    """`fastmath serve` of the benchmark's checkpoint as "demo", with the run's slots and context."""

    def __init__(self, ckpt: Path, a, log_path: Path):
        super().__init__(ckpt, "--served-model-name", "demo", "--max-slots", str(a.max_slots), "--max-model-len",
                         str(a.max_model_len), log_path=log_path, threads=a.threads,
                         omp_threads=a.threads or os.cpu_count(), cwd=REPO)

    def metrics(self) -> dict:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0].split(":", 1)[1]] = float(value)
        return out


KILLED_CLIENT = """
import sys, httpx
body = {"model": "demo", "prompt": [1] + list(range(3, 40)), "max_tokens": int(sys.argv[2]) - 40, "ignore_eos": True,
        "stream": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=None) as r:
    lines = r.iter_lines()
    for line in lines:
        if line.startswith("data: {"):
            print("streaming", flush=True)
            break
    for line in lines:  # keep reading until killed
        pass
"""


async def run_clients(url: str, prompts, a, kill: int = 0) -> dict:
    import httpx

    latencies, lost, tokens = [], 0, 0
    queue = list(enumerate(prompts))
    limits = httpx.Limits(max_connections=a.clients + 8, max_keepalive_connections=a.clients + 8)

    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        async def client(k):
            nonlocal lost, tokens
            for j in range(a.requests):
                i, p = queue[k * a.requests + j]
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json=request_body(p, i, a))
                    body = r.json()
                    ok = r.status_code == 200 and len(body["choices"]) == a.n and \
                        all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                latencies.append(time.perf_counter() - t0)
                if ok:
                    tokens += body["usage"]["completion_tokens"]
                else:
                    lost += 1

        killed = []

        async def killer():
            """C client processes that stream a long request and are SIGKILLed after their first chunk."""
            procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED_CLIENT, url,
                                                          str(a.max_model_len), stdout=asyncio.subprocess.PIPE)
                     for _ in range(kill)]
            for pr in procs:
                line = await pr.stdout.readline()
                if pr.returncode is None:
                    try:
                        pr.send_signal(signal.SIGKILL)
                    except ProcessLookupError:  # it ended by itself (its stream failed): counted as not killed
                        pass
                await pr.wait()
                killed.append(line.strip() == b"streaming" and pr.returncode == -signal.SIGKILL)

        t0 = time.perf_counter()
        await asyncio.gather(killer(), *(client(k) for k in range(a.clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"requests": len(latencies), "lost_requests": lost, "generated_tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99),
            "latency_max_s": latencies[-1], "killed_clients": len(killed),
            "killed_after_first_chunk": sum(killed)}


def run_served(ckpt: Path, prompts, a, work: Path) -> dict:
    srv = Served(ckpt, a, work / "serve.log")
    try:
        asyncio.run(run_clients(srv.url, prompts[:2], argparse.Namespace(**{**vars(a), "clients": 1, "requests": 1})))
        before = srv.metrics()
        served = asyncio.run(run_clients(srv.url, prompts, a))
        mid = srv.metrics()
        kills = asyncio.run(run_clients(srv.url, prompts, a, kill=a.kill))
        deadline = time.time() + 30
        while srv.metrics()["slots_in_use"] and time.time() < deadline:
            time.sleep(0.1)
        after = srv.metrics()
        kills.update({"aborted_by_server": after["requests_aborted_total"] - mid["requests_aborted_total"],
                      "slots_in_use_after": after["slots_in_use"],
                      "requests_running_after": after["num_requests_running"]})
        served["aborted_by_server"] = mid["requests_aborted_total"] - before["requests_aborted_total"]
        return {"served": served, "served_with_kills": kills, "slots": after["slots_max"]}
    finally:
        srv.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a trained checkpoint directory (default: train tiny briefly)")
    p.add_argument("--train-steps", type=int, default=40, help="trainer steps for tiny (default 40)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients K (default 32)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default 2)")
    p.add_argument("--n", type=int, default=8, help="samples per request (default 8)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--max-slots", type=int, default=256, help="engine slots, offline and served (default 256)")
    p.add_argument("--max-model-len", type=int, default=256,
                   help="context of the engine, offline and served (default 256: more slots in the KV budget)")
    p.add_argument("--kill", type=int, default=8, help="clients SIGKILLed mid-stream in the third run (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, offline and in the server (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="fm_bench_serve_"))
    ckpt = Path(a.model) if a.model else train_tiny(work, a.train_steps)
    prompts, template = workload(ckpt, a)
    results = {"env": env_info(a.threads),
               "settings": {k: v for k, v in vars(a).items() if k != "model"} | {"template": template,
                                                                                "model": str(a.model or "tiny, trained")},
               "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts)}
    results["offline"] = run_offline(ckpt, prompts, a)
    print(f"offline: {results['offline']['tokens_per_s']:,.0f} tok/s ({results['offline']['generated_tokens']} tokens, "
          f"{results['offline']['slots']} slots)", flush=True)
    results.update(run_served(ckpt, prompts, a, work))
    s, k, off = results["served"], results["served_with_kills"], results["offline"]
    results["served_vs_offline"] = s["tokens_per_s"] / off["tokens_per_s"]
    results["same_tokens_as_offline"] = s["generated_tokens"] == off["generated_tokens"]
    results["env"]["loadavg_end"] = os.getloadavg()
    print(f"served:  {s['tokens_per_s']:,.0f} tok/s = {100 * results['served_vs_offline']:.0f}% of offline "
          f"({s['generated_tokens']} tokens, same as offline: {results['same_tokens_as_offline']}), "
          f"p50 {s['latency_p50_s']:.2f}s p99 {s['latency_p99_s']:.2f}s, lost {s['lost_requests']}", flush=True)
    print(f"kills:   {k['killed_after_first_chunk']}/{k['killed_clients']} clients killed mid-stream, aborted by the "
          f"server {k['aborted_by_server']:.0f}, slots in use after {k['slots_in_use_after']:.0f}; the others "
          f"{k['tokens_per_s']:,.0f} tok/s, lost {k['lost_requests']}, p99 {k['latency_p99_s']:.2f}s", flush=True)
    out = Path(os.environ.get("FASTMATH_BENCH_OUT", REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_cpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'serve_cpu.json'}")


if __name__ == "__main__":
    main()
