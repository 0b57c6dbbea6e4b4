"""The hand-written x86 GEMM (kernels/vnni_gemm.py) against integer numpy, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from gptj_tvm.frontend.layouts import quantized as quantization
from gptj_tvm.kernels.vnni_gemm import vnni_matmul
from gptj_tvm.targets.host import has_vnni
from gptj_tvm.targets.llvm import host_target

LEVELS = {"q8": (-128, 127), "q4": (-8, 7)}  # every level the stored bytes / nibbles can hold
GROUP = quantization.GROUP


def build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())


# rows: blocks of 3 sharing each weight load, the rest one at a time, fewer rows than a block (1, 2) and a
# prompt's worth (128). Quantized weights hold whole groups and tiles (check_shape refuses others), so k and n
# are multiples of 32 and 64 here.
# The bias (W_in, lm_head) and the bias and residual (the fused block's W_out) are added as y is written.
@pytest.mark.skipif(not has_vnni(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("rows,epilogue", [(1, ()), (2, ()), (3, ()), (8, ()), (13, ()), (128, ()), (1, ("bias",)),
                                           (13, ("bias",)), (2, ("bias", "residual")), (8, ("bias", "residual"))])
@pytest.mark.parametrize("scheme", ["q8", "q4"])
def test_vnni_kernel_is_exact(scheme, rows, epilogue):
    """The VNNI GEMM against numpy: each group's integer dot product x_q . q (exact, in int64), then in group
    order acc += dot * (w_scale * x_scale) in float32, the product of the scales rounded and the rest one fused
    multiply-add (LLVM contracts it; float64 holds the exact product and sum before the one rounding): the same
    bits."""
    k, n = 128, 192
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
    lib = build(vnni_matmul(k, n, scheme, GROUP, quantization.TILE, quantization.OFFSET[scheme],
                            bias="bias" in epilogue, residual="residual" in epilogue))
    args = [tvm.runtime.tensor(a) for a in (x_q, x_scale, x_sum, quantization.pack(levels, scheme),
                                            quantization.tiled(w_scale), *extra)]
    out = tvm.runtime.empty((1, rows, n), "float32")
    lib["main"](*args, out)
    np.testing.assert_array_equal(out.numpy()[0], expected)
