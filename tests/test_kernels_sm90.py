"""Every Triton kernel compiles for an H100 (sm_90) at the launch configurations of LLaMA-2 shapes, without
a GPU: Triton's NVIDIA backend and the ptxas it ships run on the CPU (kernels/_aot.py). This is the part
of the CUDA path the interpreter cannot check (the kernel group runs interpreted): that the compiler
accepts each kernel, that every block fits, and that nothing spills registers.

Runs in the core group because it needs real `@triton.jit` kernels (TRITON_INTERPRET unset).
"""
import importlib
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("ahead-of-time compilation needs TRITON_INTERPRET unset", allow_module_level=True)
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend is not installed")

from fastmath.kernels import _aot  # noqa: E402
from fastmath.kernels._dispatch import META_SM_COUNT, num_workers, rows_per_program  # noqa: E402

H100_SMEM_PER_BLOCK = 227 * 1024  # bytes of shared memory one block may use on sm_90


@pytest.fixture(scope="module")
def compiled():
    try:
        _aot.ptxas_path(90)
    except Exception as e:  # pragma: no cover - a wheel without ptxas
        pytest.skip(f"no ptxas: {e}")
    return _aot.compile_all(arch=90)


def test_every_kernel_is_compiled(compiled):
    kernels = {attr for _, attr, _ in _aot._jit_kernels()}
    assert kernels == {r.launch.name for r in compiled}, "a kernel has no case in kernels/_aot.py"
    # both gradient variants of the loss and both directions of the rotation were planned
    ce = {(r.constexprs["HAS_GRAD"], r.constexprs["IS_MEAN"]) for r in compiled if r.launch.name == "_cross_entropy_fwd_kernel"}
    assert ce == {(True, True), (True, False), (False, True)}
    assert {r.constexprs["IS_BACKWARD"] for r in compiled if r.launch.name == "_rotary_kernel"} == {False, True}


def test_no_spills_and_blocks_fit(compiled):
    bad = []
    for r in compiled:
        threads = 32 * r.options.get("num_warps", 4)
        if r.spill_bytes:
            bad.append(f"{r.line()}: spills {r.spill_bytes} bytes")
        if r.shared_bytes > H100_SMEM_PER_BLOCK:
            bad.append(f"{r.line()}: needs {r.shared_bytes} bytes of shared memory")
        if r.registers * threads > _aot.REGISTERS_PER_SM:
            bad.append(f"{r.line()}: {r.registers} registers x {threads} threads do not fit one SM")
        assert r.cubin_bytes > 0
    assert not bad, "\n".join(bad)


def test_streams_use_128_bit_accesses(compiled):
    """At LLaMA-2 shapes in bf16 the memory-bound streams compile to 128-bit loads and stores (ld/st.global.v4):
    no element-wise 16-bit stores, and at most one 16-bit load (the cross-entropy's target logit)."""
    llama = [r for r in compiled if "16384" in r.launch.case or "4096" in r.launch.case.split(" ")[1]]
    bf16 = [r for r in llama if "torch.bfloat16" in r.launch.case.split(" w=")[0]]
    assert {r.launch.name for r in bf16} == {attr for _, attr, _ in _aot._jit_kernels()}
    for r in bf16:
        ops = r.global_ops
        assert any(op.startswith("ld.global.v4") for op in ops), (r.line(), ops)
        assert not any(op.startswith("st.global") and op.endswith((".b16", ".u16")) for op in ops), (r.line(), ops)
        assert sum(n for op, n in ops.items() if op.startswith("ld.global") and op.endswith((".b16", ".u16"))) <= 1, (r.line(), ops)
        if r.constexprs.get("HAS_GRAD", True):  # everything but the loss-only cross-entropy writes a tensor
            assert any(op.startswith("st.global.v4") for op in ops), (r.line(), ops)


def test_memory_bound_kernels_keep_sms_busy(compiled):
    """Estimated resident warps per SM (registers, threads, shared memory, and the grid) at LLaMA-2 shapes:
    at least 16 of 64 for every kernel, the persistent RMSNorm backward included."""
    llama = [r for r in compiled if "16384" in r.launch.case or "N=4096 V=32000" in r.launch.case]
    assert llama
    low = [f"{r.line()} [{r.launch.case}]" for r in llama if r.resident_warps() < 16]
    assert not low, "\n".join(low)


def test_launch_plans_at_llama_shapes():
    """The meta-device plans are the GPU plans: one wide row per program, narrow rows grouped."""
    meta = torch.empty(1, device="meta")
    assert num_workers(meta) == META_SM_COUNT
    assert rows_per_program(16384, 4096, meta) == 1
    assert rows_per_program(16384, 123, meta) == 16
    cases = dict(_aot.llama_cases())
    rms = _aot.capture_all([("rms", cases["rms_norm N=16384 H=8192 x=torch.bfloat16 w=torch.float32"])])
    fwd, bwd = rms
    assert fwd.kwargs["BLOCK_ROWS"] == 1 and fwd.kwargs["BLOCK"] == 8192 and fwd.kwargs["num_warps"] == 16
    # backward: one persistent program per SM, each summing its own dW partial
    assert bwd.kwargs["BLOCK"] == 8192 and bwd.args[5].shape == (META_SM_COUNT, 8192)
    # the 70B layout: 64 query heads and 8 key/value heads rotated in one launch per token
    rot = _aot.capture_all([("rot", cases["rotary T=16384 heads=64/8 torch.bfloat16"])])[0]
    assert (rot.kwargs["BLOCK_T"], rot.kwargs["BLOCK_QH"], rot.kwargs["BLOCK_KH"], rot.kwargs["BLOCK_D"]) == (1, 64, 8, 64)


def test_fused_loss_chunks_reach_the_kernel():
    """The fused linear loss launches the cross-entropy kernel once per chunk of tokens, never on all
    16384 rows at once (at most one chunk of logits exists)."""
    flce = importlib.import_module("fastmath.kernels.fused_linear_cross_entropy")
    cases = [c for c in _aot.llama_cases() if c[0] == "fused_linear_cross_entropy N=16384 H=4096 torch.bfloat16"]
    launches = _aot.capture_all(cases)
    chunk = flce.chunk_tokens(16384, 4096, 32000)
    assert len(launches) == 16384 // chunk > 1
    assert all(launch.args[0].shape == (chunk, 32000) for launch in launches)
