"""The kernel benchmark scripts run end to end (`--smoke`: CPU, Triton interpreter, tiny shapes), so a GPU
session does not discover a broken script: every provider measures without error, the fastmath output
matches eager on the same inputs, and the JSON and markdown result files are written. Times are not checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ["rms_norm", "rotary", "swiglu", "cross_entropy", "fused_linear_cross_entropy"]
LOSSES = {"cross_entropy", "fused_linear_cross_entropy"}


@pytest.mark.parametrize("name", BENCHES)
def test_bench_script_smoke(name, tmp_path, kt):
    if kt.device != "cpu":
        pytest.skip("--smoke is the CPU check; on a GPU bench/gpu_suite.sh runs the real benchmarks")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTMATH_KERNELS": "1", "FASTMATH_BENCH_OUT": str(tmp_path),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"bench_{name}.py"), "--smoke", "--no-compile"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    rows = result["rows"]
    assert {r["provider"] for r in rows} >= {"eager", "fastmath"}
    # Liger's own kernels may not run in the interpreter (some call .to on a Python float): allowed. An error
    # from our side of a Liger adapter (a TypeError for a wrong signature, say) is not.
    errors = [r for r in rows if "error" in r and not (r["provider"] == "liger" and r["error"].startswith("InterpreterError"))]
    assert not errors, errors
    for key in ("gpu", "driver", "torch", "triton", "date", "copy_bandwidth_GBps", "targets"):
        assert key in result
    ours = [r for r in rows if r["provider"] == "fastmath"]
    assert len(ours) == len({r["case"] for r in rows}) >= 2
    for r in ours:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] >= r["fwd_ms"] * 0.5
        # same inputs as eager: a loss agrees to fp32 rounding, a bf16 output to two bf16 ulps of its largest value
        assert r["max_rel_diff_vs_eager"] <= (1e-5 if name in LOSSES else 2 ** -6), r
    table = (tmp_path / f"{name}.md").read_text()
    assert table.count("| fastmath |") == len(ours) and "## Targets" in table
