"""Shared helpers for the kernel benchmarks (bench/bench_*.py): timing, copy bandwidth, result files.

Each benchmark compares providers (fastmath, PyTorch eager, torch.compile, Liger-Kernel when importable)
on a list of cases (shapes). For every case and provider it measures, with `triton.testing.do_bench`
(warm-up, then the median): forward, forward+backward and backward = (forward+backward) - forward (the
fused losses finish their gradients in forward, so their backward cannot be timed on its own); GB/s of
the op's minimal traffic and its fraction of a device-to-device copy measured in the same run (or
TFLOP/s for compute-bound ops); the peak memory above the inputs during forward+backward; and the
largest difference from the eager output. Results go to $FASTMATH_BENCH_OUT (default bench/results) as
<name>.json and <name>.md, naming the GPU, driver, torch, triton, CUDA, shapes and date, rewritten after
every measurement so that a run cut short by its time slice keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


DEVICE = "cuda"  # set by setup(): "cpu" for a smoke run


def require_gpu(name: str) -> None:
    """Exit with one clear sentence on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}: this benchmark needs a CUDA GPU and none is available here "
                         "(run bench/gpu_suite.sh on a GPU machine, or --smoke to check the script on the CPU).")


def setup(args: argparse.Namespace, name: str) -> str:
    """The device to benchmark on: CUDA, or for --smoke the CPU under the Triton interpreter."""
    global DEVICE
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FASTMATH_KERNELS") != "1":
            raise SystemExit(f"{name} --smoke runs the kernels in the Triton interpreter: start it with "
                             "TRITON_INTERPRET=1 FASTMATH_KERNELS=1")
        os.environ.setdefault("FASTMATH_BENCH_OUT", "bench/results/smoke")
        DEVICE = "cpu"
    else:
        require_gpu(name)
        DEVICE = "cuda"
    return DEVICE


def _on_cuda() -> bool:
    return DEVICE == "cuda"


def has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def parse_args(description: str, default_budget_s: float, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget-s", type=float, default=default_budget_s,
                        help="stop starting new cases after this many seconds (results so far are kept)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--quick", action="store_true", help="only the first case")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU: Triton interpreter, tiny shapes, times meaningless "
                             "(needs TRITON_INTERPRET=1 FASTMATH_KERNELS=1; writes under bench/results/smoke)")
    return parser.parse_args(argv)


def bench_ms(fn: Callable[[], object], grad_to_none=None) -> float:
    """Median milliseconds of fn() after warm-up (triton.testing.do_bench; a smoke run: 3 timed calls)."""
    import triton.testing

    if not _on_cuda():
        times = []
        for _ in range(3):
            for t in grad_to_none or []:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def copy_bandwidth_gbps(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 1 GiB buffer, in GB/s."""
    n_bytes = n_bytes if _on_cuda() else 1 << 26
    src = torch.empty(n_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    if _on_cuda():
        torch.cuda.empty_cache()
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def environment() -> dict:
    """GPU, driver and library versions, date."""
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    env = {
        "gpu": torch.cuda.get_device_name() if _on_cuda() else "none: smoke run on the CPU, Triton interpreter",
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if has_liger():
        from importlib.metadata import PackageNotFoundError, version

        try:
            env["liger_kernel"] = version("liger-kernel")
        except PackageNotFoundError:
            env["liger_kernel"] = "unknown"
    return env


@dataclass
class Case:
    """One shape: `make()` returns (inputs, grad_outputs): a dict of tensors (leaves that need grad
    require it) and the upstream gradients for the provider's outputs (None for a scalar loss)."""

    label: str
    shape: dict
    make: Callable[[], tuple]
    bytes_fwd: int = 0  # minimal traffic of the op; 0 for compute-bound ops
    bytes_bwd: int = 0
    flops_fwd: int = 0  # for compute-bound ops
    flops_bwd: int = 0


@dataclass
class Benchmark:
    name: str  # result file stem
    title: str
    providers: dict  # name -> fn(**inputs) -> tensor or tuple of tensors
    cases: list
    targets: Callable[[list], list] = None  # rows -> lines of text
    notes: list = field(default_factory=list)


def make_inputs(case: Case) -> tuple:
    """case.make() from a fixed seed: every provider, and the eager output it is compared with, gets the
    same inputs."""
    torch.manual_seed(0)
    if _on_cuda():
        torch.cuda.manual_seed(0)
    return case.make()


def _backward(out, grads):
    outs = out if isinstance(out, tuple) else (out,)
    grads = grads if isinstance(grads, tuple) else (grads,)
    torch.autograd.backward(outs, [None if g is None else g for g in grads])


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def measure(case: Case, fn, copy_gbps: float, eager_out=None) -> dict:
    inputs, grads = make_inputs(case)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    fwd = lambda: fn(**inputs)  # noqa: E731
    full = lambda: _backward(fn(**inputs), grads)  # noqa: E731
    row = {"case": case.label, **case.shape}
    out = fwd()
    if eager_out is not None:
        row["max_abs_diff_vs_eager"] = (_first(out).float() - eager_out.float()).abs().max().item()
        row["max_rel_diff_vs_eager"] = row["max_abs_diff_vs_eager"] / max(eager_out.float().abs().max().item(), 1e-30)
    del out
    row["fwd_ms"] = bench_ms(fwd, leaves)
    row["fwd_bwd_ms"] = bench_ms(full, leaves)
    row["bwd_ms"] = max(row["fwd_bwd_ms"] - row["fwd_ms"], 0.0)
    for key, n_bytes, ms in (("fwd", case.bytes_fwd, row["fwd_ms"]), ("fwd_bwd", case.bytes_fwd + case.bytes_bwd,
                                                                       row["fwd_bwd_ms"])):
        if n_bytes:
            row[f"{key}_GBps"] = n_bytes / (ms * 1e-3) / 1e9
            row[f"{key}_frac_copy_bw"] = row[f"{key}_GBps"] / copy_gbps
    if case.flops_fwd:
        row["fwd_bwd_TFLOPs"] = (case.flops_fwd + case.flops_bwd) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    for t in leaves:
        t.grad = None
    if _on_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        full()
        torch.cuda.synchronize()
        row["peak_mem_above_inputs_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del inputs, grads, leaves
        torch.cuda.empty_cache()
    else:  # no allocator statistics on the CPU
        row["peak_mem_above_inputs_MB"] = None
    return row


def run(bench: Benchmark, args: argparse.Namespace) -> list:
    """Measure every (case, provider) within the time budget, in the order given (put eager first: the others
    are compared with its output); rewrite the result files after each measurement."""
    from fastmath.kernels._dispatch import HAS_TRITON

    if not HAS_TRITON or os.environ.get("FASTMATH_KERNELS") == "0":
        raise SystemExit(f"{bench.name}: the fastmath Triton path is off (no triton, or FASTMATH_KERNELS=0).")
    start = time.time()
    meta = {"benchmark": bench.title, **environment(), "copy_bandwidth_GBps": copy_bandwidth_gbps(),
            "timing": ("triton.testing.do_bench median (warmup 25 ms, rep 100 ms)" if _on_cuda() else
                       "median of 3 calls (smoke run: meaningless)") + "; bwd = fwd_bwd - fwd",
            "notes": bench.notes, "skipped_cases": []}
    print(f"{bench.title}: {meta['gpu']}, copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    providers = {k: v for k, v in bench.providers.items() if not (args.no_compile and k == "torch.compile")}
    rows = []
    cases = bench.cases[:1] if args.quick else bench.cases
    for i, case in enumerate(cases):
        if time.time() - start > args.budget_s:
            meta["skipped_cases"] = [c.label for c in cases[i:]]
            print(f"time budget {args.budget_s:.0f}s reached: skipping {meta['skipped_cases']}", flush=True)
            break
        eager_out = None
        for name, fn in providers.items():
            try:
                if name == "eager":
                    inputs, _ = make_inputs(case)
                    with torch.no_grad():
                        eager_out = _first(fn(**inputs)).detach()
                    del inputs
                row = {"provider": name, **measure(case, fn, meta["copy_bandwidth_GBps"],
                                                   None if name == "eager" else eager_out)}
            except Exception as e:  # one provider failing (OOM, an API change in Liger) must not stop the run
                row = {"provider": name, "case": case.label, **case.shape, "error": f"{type(e).__name__}: {e}"[:300]}
                if _on_cuda():
                    torch.cuda.empty_cache()
            rows.append(row)
            print(_format_row(row), flush=True)
            write_results(bench, meta, rows)
        eager_out = None
    write_results(bench, meta, rows)
    return rows


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"  {row['case']:<28} {row['provider']:<14} error: {row['error']}"
    bw = f"{row['fwd_bwd_GBps']:7.0f} GB/s ({100 * row['fwd_bwd_frac_copy_bw']:3.0f}%)" if "fwd_bwd_GBps" in row else \
        f"{row.get('fwd_bwd_TFLOPs', 0):7.1f} TFLOP/s"
    return (f"  {row['case']:<28} {row['provider']:<14} fwd {row['fwd_ms']:8.3f} ms  bwd {row['bwd_ms']:8.3f} ms  "
            f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms  {bw}  peak {_mb(row['peak_mem_above_inputs_MB']):>8} MB")


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(bench: Benchmark, meta: dict, rows: list) -> str:
    lines = [f"# {bench.title}", "",
             f"{meta['gpu']}, driver {meta['driver']}, CUDA {meta['cuda']}, torch {meta['torch']}, "
             f"triton {meta['triton']}" + (f", liger-kernel {meta['liger_kernel']}" if "liger_kernel" in meta else
                                           ", Liger-Kernel not installed") + f"; {meta['date']}.",
             f"Device-to-device copy: {meta['copy_bandwidth_GBps']:.0f} GB/s. Timing: {meta['timing']}.", ""]
    lines += [f"- {n}" for n in bench.notes]
    if meta["skipped_cases"]:
        lines.append(f"- Not measured (time slice reached): {', '.join(meta['skipped_cases'])}")
    lines += ["", "| case | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s (% copy) or TFLOP/s | "
                  "peak MB above inputs | max abs diff vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['provider']} | error: {r['error'][:80]} | | | | | |")
            continue
        rate = (f"{r['fwd_bwd_GBps']:.0f} ({100 * r['fwd_bwd_frac_copy_bw']:.0f}%)" if "fwd_bwd_GBps" in r
                else f"{r.get('fwd_bwd_TFLOPs', 0):.1f} TFLOP/s")
        diff = f"{r['max_abs_diff_vs_eager']:.2e}" if "max_abs_diff_vs_eager" in r else "-"
        lines.append(f"| {r['case']} | {r['provider']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                     f"| {rate} | {_mb(r['peak_mem_above_inputs_MB'])} | {diff} |")
    if bench.targets:
        lines += ["", "## Targets", ""] + [f"- {t}" for t in bench.targets(rows)]
    return "\n".join(lines) + "\n"


def write_results(bench: Benchmark, meta: dict, rows: list) -> Path:
    out = Path(os.environ.get("FASTMATH_BENCH_OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    targets = bench.targets(rows) if bench.targets else []
    (out / f"{bench.name}.json").write_text(json.dumps({**meta, "rows": rows, "targets": targets}, indent=1) + "\n")
    (out / f"{bench.name}.md").write_text(markdown(bench, meta, rows))
    return out


def find_row(rows: list, case: str, provider: str):
    for r in rows:
        if r["case"] == case and r["provider"] == provider and "error" not in r:
            return r
    return None


def liger_targets(rows: list) -> list:
    """Within 5% of Liger-Kernel's fwd+bwd time, or faster, on every shared case."""
    lines = []
    for r in rows:
        if r["provider"] != "liger":
            continue
        ours = find_row(rows, r["case"], "fastmath")
        if ours and "error" not in r:
            ratio = ours["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            lines.append(f"{r['case']}: fastmath / Liger fwd+bwd time = {ratio:.2f} "
                         f"({'met' if ratio <= 1.05 else 'NOT met'}: <= 1.05)")
    if not any(r["provider"] == "liger" for r in rows):
        lines.append("Liger-Kernel comparison: not run (liger_kernel is not importable here).")
    return lines


def bandwidth_targets(rows: list, case: str) -> list:
    """>= 80% of copy bandwidth and >= 2x eager, fwd+bwd, at the given case."""
    ours, eager = find_row(rows, case, "fastmath"), find_row(rows, case, "eager")
    if not ours:
        return [f"{case}: not measured"]
    lines = [f"{case}: fastmath fwd+bwd at {100 * ours['fwd_bwd_frac_copy_bw']:.0f}% of copy bandwidth "
             f"({'met' if ours['fwd_bwd_frac_copy_bw'] >= 0.8 else 'NOT met'}: >= 80%)"]
    if eager:
        speedup = eager["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        lines.append(f"{case}: {speedup:.2f}x PyTorch eager fwd+bwd ({'met' if speedup >= 2 else 'NOT met'}: >= 2x)")
    return lines


def compiled(fn):
    """torch.compile of an eager function (default options, as a user would write it)."""
    return torch.compile(fn)


def liger_function(name: str):
    """A function from liger_kernel.transformers.functional, or None when Liger is absent."""
    if not has_liger():
        return None
    try:
        module = importlib.import_module("liger_kernel.transformers.functional")
        return getattr(module, name)
    except (ImportError, AttributeError) as e:
        print(f"Liger-Kernel present but {name} is unavailable: {e}", file=sys.stderr)
        return None
