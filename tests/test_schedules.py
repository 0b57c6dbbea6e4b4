"""Default schedules change how kernels run, never what they compute: each scheduled kernel against itself
unscheduled, on random inputs, with dynamic lengths that do not divide the tiles."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from gptj_tvm.frontend.config import PRESETS
from gptj_tvm.ir import pipeline
from gptj_tvm.schedules.cpu_matmul import CPUMatmul
from gptj_tvm.compiler.build import export_model
from gptj_tvm.targets.llvm import host_target


def kernels(dtype: str, fuse_block: bool):
    target = host_target()
    mod, _ = export_model(PRESETS["tiny"], dtype, fuse_block)
    mod = pipeline.optimize(mod, target)
    return target, [(gv.name_hint, f.with_attr("global_symbol", "main")) for gv, f in mod.functions.items()
                    if isinstance(f, tvm.tirx.PrimFunc)]


def run(func, target, inputs):
    with target:
        lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(x) for x in inputs]
    lib["main"](*args)
    return args[-1].numpy().astype(np.float32)


@pytest.mark.parametrize("fuse_block", [True, False])
@pytest.mark.parametrize("length", [3, 5])
def test_matmul_rule_keeps_results(length, fuse_block):
    target, funcs = kernels("float32", fuse_block)
    rule = CPUMatmul()
    scheduled = 0
    for name, func in funcs:
        sch = rule.apply(func, target, False)
        if sch is None:
            continue
        shapes = [([int(s) if isinstance(s, tvm.tirx.IntImm) else length for s in p.ty.shape], str(p.ty.dtype))
                  for p in func.params]
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shape).astype(dtype) for shape, dtype in shapes]
        expected = run(func, target, inputs)
        actual = run(sch.mod["main"], target, inputs)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        scheduled += 1
    assert scheduled >= 5  # the block's GEMMs and the lm_head, in prefill and in decode


def test_decode_gemvs_prefetch_their_weight_rows_and_prefill_gemms_do_not():
    """prefetch.py writes one prefetch per cache line of the row PREFETCH_BYTES ahead (into L2) into a GEMV's
    reduction loop (the IR before: no prefetch; after: the call, on the weight, inside the k loop); the numbers stay
    (test_matmul_rule_keeps_results and the model tests run with it)."""
    from gptj_tvm.schedules.prefetch import LOCALITY, PREFETCH_BYTES, with_weight_prefetch

    target, funcs = kernels("bfloat16", True)
    gemvs = gemms = 0
    for name, func in funcs:
        with target:
            sch = CPUMatmul(prefetch=False).apply(func, target, False)
        if sch is None:
            continue
        before = sch.mod["main"]
        after = with_weight_prefetch(before)
        assert "llvm.prefetch" not in before.script()
        decode = all(isinstance(s, tvm.tirx.IntImm) for p in func.params for s in getattr(p.ty, "shape", ()))
        if decode:
            text = after.script()
            loop = text.index("for k in range(")
            call = text.index("llvm.prefetch")
            assert loop < call < text.index("for j_1 in T.vectorized", loop), name
            line = text[call:text.index("\n", call)]
            ahead = re.search(r"k \+ T\.int64\((\d+)\), line \* ", line)
            tile = re.search(r"(\w*weight\w*): T\.Buffer\(\(T\.int64\(\d+\), T\.int64\(\d+\), T\.int64\((\d+)\)", text)
            assert ahead and tile and tile.group(1) in line and line.endswith(f", 0, {LOCALITY}, 1)"), (name, line)
            assert int(ahead.group(1)) == PREFETCH_BYTES // (int(tile.group(2)) * 2), name  # bfloat16 rows
            gemvs += 1
        else:
            assert after.same_as(before) or "llvm.prefetch" not in after.script(), name
            gemms += 1
    assert gemvs >= 3 and gemms >= 3
