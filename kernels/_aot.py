"""Compile every kernel for a CUDA GPU ahead of time, without a GPU: `python -m fastmath.kernels._aot`.

The launchers run on meta tensors (which `_dispatch` plans exactly as it would on a GPU, with an H100's
132 SMs), so the block sizes, warps and dtypes are the ones a real launch at that shape would use. Each
launch is captured instead of run, compiled by Triton's NVIDIA backend to PTX and a cubin (Triton ships
ptxas), and ptxas is asked for its register, spill and shared-memory report. This catches what the
interpreter cannot: constructs the compiler rejects, dtype mismatches in loop-carried values, blocks that
do not fit, and register spills. It says nothing about speed, and nothing is executed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

KERNEL_MODULES = ["rms_norm", "rotary", "cross_entropy", "swiglu"]
# sm_80 and sm_90 per-SM limits (the occupancy estimate in Compiled)
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}


@dataclass
class Launch:
    """One captured launch: the kernel, the case that made it, and its arguments."""

    case: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple = (1,)  # programs launched

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Compiled:
    launch: Launch
    signature: dict
    constexprs: dict
    options: dict
    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared_bytes: int
    cubin_bytes: int
    global_ops: dict  # PTX global load/store instructions by form, e.g. {"ld.global.v4.b32": 4}: vectorisation

    def blocks_per_sm(self) -> int:
        """Blocks an H100 SM can hold at once, limited by registers (allocated per warp in units of 256),
        threads and shared memory."""
        warps = self.options.get("num_warps", 4)
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
        by_smem = SMEM_PER_SM // self.shared_bytes if self.shared_bytes else MAX_BLOCKS_PER_SM
        return max(0, min(by_regs, MAX_WARPS_PER_SM // warps, by_smem, MAX_BLOCKS_PER_SM))

    def resident_warps(self, n_sms: int = 132) -> int:
        """Warps resident per SM for this launch's grid: a persistent grid of one program per SM cannot use
        more than one block's warps, whatever fits."""
        programs = 1
        for g in self.launch.grid:
            programs *= g
        return min(self.blocks_per_sm(), -(-programs // n_sms)) * self.options.get("num_warps", 4)

    def line(self) -> str:
        meta = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return (f"{self.launch.name:<28} {meta:<60} warps={self.options.get('num_warps', 4):<3} "
                f"regs={self.registers:<4} spill={self.spill_bytes:<5} smem={self.shared_bytes:<6} "
                f"resident warps/SM={self.resident_warps()}/{MAX_WARPS_PER_SM}")


def _jit_kernels():
    """(module, attribute name, JITFunction) of every kernel; raises under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel"):
                if not isinstance(value, JITFunction):
                    raise RuntimeError(f"{name}.{attr} is {type(value).__name__}, not a JITFunction: ahead-of-time "
                                       "compilation needs TRITON_INTERPRET unset")
                found.append((module, attr, value))
    return found


@contextlib.contextmanager
def capture(launches: list, case: str):
    """Within the block, kernel launches append a Launch to `launches` instead of running."""
    kernels = _jit_kernels()
    saved = []
    try:
        for _, _, kernel in kernels:
            saved.append((kernel, kernel.__dict__.get("run")))

            def run(*args, _kernel=kernel, grid=None, warmup=False, **kwargs):
                launches.append(Launch(case, _kernel, args, kwargs, tuple(grid) if grid is not None else (1,)))

            kernel.run = run
        yield
    finally:
        for kernel, old in saved:
            if old is None:
                del kernel.run
            else:
                kernel.run = old


def llama_cases():
    """(case name, fn) pairs that call the launchers on meta tensors at LLaMA-2 shapes and a few odd ones."""
    # by module path: the package's public functions shadow the submodules of the same names
    ce, flce, rn, ro, sg = (importlib.import_module(f"{__package__}.{m}") for m in
                            ("cross_entropy", "fused_linear_cross_entropy", "rms_norm", "rotary", "swiglu"))

    meta = torch.device("meta")

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device=meta)

    cases = []
    for n, h in [(16384, 4096), (16384, 5120), (16384, 8192), (5, 123), (1, 4096)]:
        for xd, wd in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]:
            def f(n=n, h=h, xd=xd, wd=wd):
                x, w = t(n, h, dtype=xd), t(h, dtype=wd)
                _, rstd = rn._rms_norm_fwd(x, w, 1e-5)
                rn._rms_norm_bwd(t(n, h, dtype=xd), x, w, rstd)
            cases.append((f"rms_norm N={n} H={h} x={xd} w={wd}", f))
    for n, hq, hk in [(16384, 32, 32), (16384, 40, 40), (16384, 64, 8), (3, 5, 1)]:
        for dt in (torch.bfloat16, torch.float32):
            def f(n=n, hq=hq, hk=hk, dt=dt):
                q, k, pos = t(n, hq, 128, dtype=dt), t(n, hk, 128, dtype=dt), t(n, dtype=torch.int64)
                inv_freq = t(64, dtype=torch.float32)
                for backward in (False, True):
                    ro._rotary(q, k, pos, inv_freq, backward)
            cases.append((f"rotary T={n} heads={hq}/{hk} {dt}", f))
    for n, v in [(4096, 32000), (7, 101), (2, 65536)]:
        for dt in (torch.bfloat16, torch.float32):
            def f(n=n, v=v, dt=dt):
                logits, labels, n_valid = t(n, v, dtype=dt), t(n, dtype=torch.int64), t((), dtype=torch.int64)
                for reduction in ("mean", "sum"):
                    ce.cross_entropy_fwd(logits, labels, n_valid, -100, reduction, grad=logits)
                ce.cross_entropy_fwd(logits, labels, n_valid, -100, "mean", grad=None)
            cases.append((f"cross_entropy N={n} V={v} {dt}", f))
    # (under autocast the chunk's logits are bf16 too, so these two dtypes cover it)
    for n, h, dt in [(16384, 4096, torch.bfloat16), (16384, 8192, torch.bfloat16), (1000, 4096, torch.float32)]:
        def f(n=n, h=h, dt=dt):
            hidden, weight, labels = t(n, h, dtype=dt), t(32000, h, dtype=dt), t(n, dtype=torch.int64)
            flce._FusedLinearCrossEntropy.apply(hidden, weight, labels, -100, "mean", True, True, ce.cross_entropy_fwd)
        cases.append((f"fused_linear_cross_entropy N={n} H={h} {dt}", f))
    for shape in [(16384, 11008), (16384, 28672), (3, 7)]:
        for dt in (torch.bfloat16, torch.float32):
            def f(shape=shape, dt=dt):
                gate, up = t(*shape, dtype=dt), t(*shape, dtype=dt)
                sg._swiglu_fwd(gate, up)
                sg._swiglu_bwd(t(*shape, dtype=dt), gate, up)
            cases.append((f"swiglu {shape} {dt}", f))
    return cases


def capture_all(cases=None) -> list:
    launches = []
    for case, fn in cases if cases is not None else llama_cases():
        with capture(launches, case):
            fn()
    return launches


def specialise(launch: Launch):
    """Triton's signature, constexprs, divisibility attributes and options for a captured launch."""
    params = launch.kernel.params
    bound = dict(zip([p.name for p in params], launch.args))
    options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages", "num_ctas")}
    bound.update({k: v for k, v in launch.kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.name not in bound:
            raise TypeError(f"{launch.name}: argument {p.name} was not given")
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as Triton assumes
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {p.name}={value!r}")
    return signature, constexprs, attrs, options


def ptxas_path(arch: int) -> Path:
    """The ptxas Triton itself uses for this arch (the one that accepts the PTX version it emits)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(arch)
    except TypeError:  # triton < 3.7: one ptxas for every arch
        tool = compiler.get_ptxas()
    return Path(tool.path)


def _ptxas_report(ptx: str, arch: int) -> tuple:
    """(registers, spill bytes, shared bytes) from `ptxas -v`."""
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas_path(arch)), "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                               str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = max(int(m) for m in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    smem = max([int(m) for m in re.findall(r"(\d+) bytes smem", log)] or [0])
    return regs, spills, smem


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    regs, spills, smem = _ptxas_report(ptx, arch)
    ops = {}
    for op in re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx):
        ops[op] = ops.get(op, 0) + 1
    return Compiled(launch, signature, constexprs, options, regs, spills, max(smem, kernel.metadata.shared),
                    len(kernel.asm["cubin"]), ops)


def compile_all(arch: int = 90, cases=None, log=None) -> list:
    """Compile each distinct specialisation once; returns the Compiled list."""
    seen, results = set(), []
    for launch in capture_all(cases):
        signature, constexprs, attrs, options = specialise(launch)
        key = (launch.name, tuple(signature.items()), tuple(constexprs.items()), tuple(sorted(attrs)),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        results.append(compile_launch(launch, arch))
        if log:
            log(f"{results[-1].line()}  [{launch.case}]")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, log=print)
    spilled = [r for r in results if r.spill_bytes]
    print(f"{len(results)} specialisations compiled for sm_{args.arch} with triton {triton.__version__}; "
          f"{len(spilled)} spill registers")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
