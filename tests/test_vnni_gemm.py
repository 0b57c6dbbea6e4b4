"""The hand-written x86 int8 GEMMs (tir_kernels/vnni_gemm.py on AVX-512 VNNI, tir_kernels/ymm_gemm.py on AVX-VNNI and
AVX2) against integer numpy, exactly. Each runs where this CPU has its instructions; elsewhere it is compiled
for a CPU that has them, and its code checked for them (no test asks this CPU for an instruction it lacks)."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import tvm

from gptj_tvm.frontend.layouts import quantized as quantization
from gptj_tvm.tir_kernels.vnni_gemm import quantize_activations
from gptj_tvm.tir_kernels.ymm_gemm import int8_matmul
from gptj_tvm.targets.host import cpu_flags
from gptj_tvm.targets.llvm import cpu_target, host_target

LEVELS = {"q8": (-128, 127), "q4": (-8, 7)}  # every level the stored bytes / nibbles can hold
GROUP = quantization.GROUP


def build(func, target=None):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          target=target or host_target())


# each int8 dot product: a CPU that has it, and the instruction its code must hold (as a regular expression)
ISAS = {"avx512-vnni": ("sapphirerapids", r"\svpdpbusd\s[^\n]*%zmm"),
        "avx-vnni": ("alderlake", r"\{vex\}\s+vpdpbusd\s[^\n]*%ymm"), "avx2": ("haswell", r"\svpmaddubsw\s[^\n]*%ymm")}


def host_runs(isa: str) -> bool:
    return set(quantization.INT8_DOTS[isa]) <= cpu_flags()


# A serving step of 4 to 31 rows runs one 16-column lane at a time, in blocks of 8 rows and their remainders as
# blocks of 4, 2 and 1 (5, 7, 8, 13, 22), over K in chunks of 16 groups (k 1088: two whole chunks and one of 2
# groups, the sum going on through y); decode's 1-3 rows and a prompt (32 rows and more) run the whole tile in
# blocks of 3 rows and a remainder of 1 or 2 (1, 2, 3, 32, 35, 128). Quantized weights hold whole groups and
# tiles (check_shape refuses others), so k and n are multiples of 32 and 64 here.
# The bias (W_in, lm_head) and the bias and residual (the fused block's W_out) are added as y is written.
@pytest.mark.parametrize("k,rows,epilogue", [
    (128, 1, ()), (128, 2, ()), (128, 3, ()), (128, 5, ()), (128, 7, ()), (128, 8, ()), (128, 13, ()), (128, 22, ()),
    (128, 32, ()), (128, 128, ()), (128, 1, ("bias",)), (1088, 5, ("bias", "residual")), (1088, 13, ("bias",)),
    (1088, 35, ("bias", "residual")), (128, 13, ("bias",)), (128, 2, ("bias", "residual")),
    (128, 8, ("bias", "residual"))])
@pytest.mark.parametrize("scheme", ["q8", "q4"])
@pytest.mark.parametrize("isa", [isa for isa in ISAS if host_runs(isa)])
def test_int8_kernel_is_exact(isa, scheme, k, rows, epilogue):
    """Each int8 GEMM this CPU runs against numpy: each group's integer dot product x_q . q (exact, in int64),
    then in group order acc += dot * (w_scale * x_scale) in float32, the product of the scales rounded and the
    rest one fused multiply-add (LLVM contracts it; float64 holds the exact product and sum before the one
    rounding): the same bits. The levels include -128 (q8's stored 0), which AVX2's sign trick must hold."""
    n = 192
    rng = np.random.default_rng(rows)
    levels = rng.integers(LEVELS[scheme][0], LEVELS[scheme][1] + 1, size=(k, n)).astype(np.int8)
    w_scale = rng.uniform(0.5, 2.0, size=(k // GROUP, n)).astype(np.float16)
    x_q = rng.integers(-127, 128, size=(1, rows, k)).astype(np.int8)
    x_scale = rng.uniform(0.1, 1.0, size=(1, rows, k // GROUP)).astype(np.float32)
    x_sum = x_q.reshape(1, rows, k // GROUP, GROUP).astype(np.int32).sum(-1).astype(np.int32)
    dots = np.einsum("rgk,gkc->rgc", x_q[0].reshape(rows, k // GROUP, GROUP).astype(np.int64),
                     levels.reshape(k // GROUP, GROUP, n).astype(np.int64))
    expected = np.zeros((rows, n), np.float32)
    for g in range(k // GROUP):
        scale = w_scale[g].astype(np.float32)[None] * x_scale[0][:, g:g + 1]  # float32, rounded
        expected = (expected.astype(np.float64) + dots[:, g].astype(np.float64) * scale).astype(np.float32)
    extra = [rng.standard_normal({"bias": (n,), "residual": (1, rows, n)}[name], dtype=np.float32)
             for name in epilogue]
    for term in extra:  # the graph's order: (x W + b) + h
        expected = expected + term.reshape(-1, n)
    lib = build(int8_matmul(isa, k, n, scheme, GROUP, quantization.TILE, quantization.OFFSET[scheme],
                            bias="bias" in epilogue, residual="residual" in epilogue))
    args = [tvm.runtime.tensor(a) for a in (x_q, x_scale, x_sum, quantization.pack(levels, scheme),
                                            quantization.tiled(w_scale), *extra)]
    out = tvm.runtime.empty((1, rows, n), "float32")
    lib["main"](*args, out)
    np.testing.assert_array_equal(out.numpy()[0], expected)


@pytest.mark.parametrize("scheme", ["q8", "q4"])
@pytest.mark.parametrize("isa", ISAS)
def test_int8_kernels_compile_for_a_cpu_with_their_instructions(isa, scheme):
    """Every kernel builds for a CPU that has its instructions, whatever this one has, and uses them (its
    numbers are tested above where this CPU runs it; AVX2 runs on every x86 CPU)."""
    cpu, instruction = ISAS[isa]
    spec = (256, 128, scheme, GROUP, quantization.TILE, quantization.OFFSET[scheme])
    assembly = build(int8_matmul(isa, *spec, bias=True), cpu_target(cpu)).inspect_source("asm")
    assert re.search(instruction, assembly)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_activation_quantizer_matches_its_definition(x_dtype, rows):
    """vnni_matmul's input against numpy: per group of 32, scale = max |x| / 127 in float32 (1 for an all-zero
    group), x_q = round half even(x / scale), x_sum = sum of x_q. One group is all zeros, one holds exact
    halves after division (ties go to even)."""
    k = 256
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, k), dtype=np.float32) * rng.uniform(0.01, 100, (1, rows, 1)).astype(np.float32)
    x[0, 0, 32:64] = 0
    x[0, 0, 64:96] = np.float32(127) * np.array([0.5, 1.5, 2.5, -0.5, -2.5] + [1.0] * 27, np.float32)
    x = x.astype(ml_dtypes.bfloat16) if x_dtype == "bfloat16" else x
    x32 = x.astype(np.float32).reshape(1, rows, k // GROUP, GROUP)
    largest = np.abs(x32).max(-1)
    scale = np.where(largest > 0, largest / np.float32(127), np.float32(1)).astype(np.float32)
    x_q = np.rint(x32 / scale[..., None]).astype(np.int8)
    lib = build(quantize_activations(k, GROUP, x_dtype))
    outs = [tvm.runtime.empty((1, rows, k), "int8"), tvm.runtime.empty((1, rows, k // GROUP), "float32"),
            tvm.runtime.empty((1, rows, k // GROUP), "int32")]
    lib["main"](tvm.runtime.tensor(x), *outs)
    np.testing.assert_array_equal(outs[1].numpy(), scale)
    np.testing.assert_array_equal(outs[0].numpy(), x_q.reshape(1, rows, k))
    np.testing.assert_array_equal(outs[2].numpy(), x_q.astype(np.int32).sum(-1))
