"""The GPU parts of bench/sampler.py (--gpu) and bench/train_step.py (--device cuda --mfu) run end to end on
the CPU with --smoke (tiny shapes, numbers meaningless), with the flags bench/suite.d/20-sampler.sh and
30-train.sh pass, so a scarce GPU session is not the first to find a crash in them. Checks: exit code 0, the
smoke result files with the keys the GPU run writes, finite positive numbers, and no real result file written."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_RESULTS = ["sampler_gpu.json", "sampler_cpu.json", "train_step_cuda.json", "train_step_cuda.md",
                "train_step_cpu.json", "train_step_cpu.md"]


def run_bench(tmp_path: Path, script: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMATH_KERNELS", "FASTMATH_ATTENTION", "TRITON_INTERPRET")}
    env.update(FASTMATH_BENCH_OUT=str(tmp_path), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *flags], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    print(f"{script} {' '.join(flags)}: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert not set(written) & set(REAL_RESULTS), f"a smoke run wrote a real result file: {written}"
    return proc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_sampler_gpu_path_smoke(tmp_path):
    run_bench(tmp_path, "sampler.py", "--gpu", "--smoke")  # suite.d/20-sampler.sh: --gpu
    res = json.loads((tmp_path / "sampler_gpu_smoke.json").read_text())
    assert res["smoke"] is True
    assert positive(res["copy_bandwidth_GBps"])
    # the KV-budget plan: a small budget on the CPU, so the budget (not the slot cap) sets the count
    slots = res["max_concurrent_sequences_512_new_tokens"]
    assert isinstance(slots, int) and 1 <= slots < 256
    (name, m), = res["models"].items()
    assert name.endswith("-random-bf16")
    for key in ("params", "n", "max_new_tokens", "tokens", "seconds", "tokens_per_s", "samples_per_s", "slots",
                "mean_batch", "decode_step_ms", "bytes_per_step_GB", "roofline_fraction",
                "roofline_fraction_vs_3350GBps"):
        assert positive(m[key]), (key, m[key])
    # every sample ran to max_new_tokens or stopped at the random EOS id
    assert m["tokens"] <= len(m["prompt_tokens"]) * m["n"] * m["max_new_tokens"]
    assert m["slots"] <= m["n"]


def test_train_step_mfu_path_smoke(tmp_path):
    # suite.d/30-train.sh's flags; --smoke forces the CPU and tiny shapes
    run_bench(tmp_path, "train_step.py", "--device", "cuda", "--dim", "1024", "--layers", "8", "--heads", "16",
              "--budget", "16384", "--steps", "8", "--mfu", "--budget-s", "80", "--smoke")
    res = json.loads((tmp_path / "train_step_smoke.json").read_text())
    assert res["smoke"] is True and res["device"].startswith("cpu")
    c = res["comparison"]
    for name in ("fastmath_packed", "hf_sdpa_padded_random", "hf_sdpa_padded_grouped"):
        assert c[name]["steps"] >= 1
        assert positive(c[name]["useful_tokens_per_s"]) and positive(c[name]["median_step_s"])
    assert positive(c["speedup_vs_best_hf"])
    rows = res["mfu"]
    assert {(r["backend"], r["kernels"]) for r in rows} == {("torch", True), ("torch", False)}
    for r in rows:
        assert "skipped" not in r, r
        for key in ("useful_tokens_per_s", "median_step_s", "params", "mfu_vs_989", "mfu_vs_measured",
                    "measured_peak_tflops"):
            assert positive(r[key]), (key, r)
        assert r["max_memory_gb"] is None  # CUDA only
    table = (tmp_path / "train_step_smoke.md").read_text()
    assert "SMOKE RUN" in table and table.count("| torch |") == 2
