"""The bfloat16 pair-layout GEMM (tir_kernels/pair_gemm.py) and its weight layout (frontend/layouts/column_pairs.py)."""

from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest
import tvm

from gptj_tvm.frontend.layouts import COLUMN_PAIRS, COLUMN_TILES, LayoutPlan
from gptj_tvm.tir_kernels.pair_gemm import pair_matmul
from gptj_tvm.frontend.layouts.column_pairs import pair_tile, paired
from gptj_tvm.targets.host import has_avx512_bf16
from gptj_tvm.targets.llvm import host_target, parse_cpu_target
from gptj_tvm.runtime.artifact import ArtifactMetadata
from reference import rel_max_error
from test_model import TOLERANCE, prompt_for


def run(k: int, n: int, rows: int, x_dtype: str, epilogue: tuple[str, ...] = (), seed: int = 0, dot: bool = False,
        lanes: int = 16):
    """(x, w, the extra inputs (bias, residual), y) of the kernel on random inputs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n), dtype=np.float32).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((1, rows, k), dtype=np.float32).astype(x_dtype)
    shapes = {"bias": (n,), "residual": (1, rows, n)}
    extra = [rng.standard_normal(shapes[name], dtype=np.float32) for name in epilogue]
    func = pair_matmul(k, n, pair_tile(k, n), x_dtype, bias="bias" in epilogue, residual="residual" in epilogue,
                       dot=dot, lanes=lanes)
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())
    out = tvm.runtime.empty((1, rows, n), "float32")
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, paired(w), *extra)), out)
    return x, w, extra, out.numpy()


# rows: the position blocks of 4 and the rest one at a time (decode: 1; 2, 3: fewer rows than a block);
# 1024 inputs: two k blocks of 256 pair rows (partial sums stored and read back); 74 inputs: 37 pair rows, k
# blocks of one; 216 and 48 columns: tiles of 8 and 16 (8- and 16-lane vectors); the bias (W_in) and the bias
# and residual (the fused block's W_out) added as the last k block is written
SHAPES = [(1024, 192, 1, ()), (1024, 192, 2, ()), (1024, 192, 3, ()), (1024, 192, 4, ()), (1024, 192, 8, ()),
          (1024, 192, 9, ()), (48, 216, 5, ()), (74, 24, 13, ()), (120, 48, 6, ()), (256, 64, 128, ()),
          (1024, 192, 1, ("bias",)), (1024, 192, 6, ("bias", "residual")), (48, 216, 5, ("bias", "residual"))]


@pytest.mark.parametrize("dot,lanes", [(False, 16), (False, 8), (True, 16)],
                         ids=["widened", "widened-256-bit", "vdpbf16ps"])
@pytest.mark.parametrize("k,n,rows,epilogue", SHAPES)
def test_bfloat16_kernel_is_the_float32_sum_in_order(k, n, rows, epilogue, dot, lanes):
    """bfloat16 products are exact in float32, and the kernel adds them in a fixed order: k order when it widens
    the weights, and for each pair 2r + 1 then 2r on vdpbf16ps (its definition: two chained float32 adds, round
    to nearest even; the random inputs here are far from the denormals it flushes). numpy's float32 running sum
    in the same order, then the bias, then the residual, gives the same bits. With 256-bit registers (lanes 8:
    the kernel's AVX2 blocks, which run on every x86 CPU) too."""
    if dot and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16 (vdpbf16ps)")
    x, w, extra, actual = run(k, n, rows, "bfloat16", epilogue, dot=dot, lanes=lanes)
    expected = np.zeros((rows, n), np.float32)
    x32, w32 = x[0].astype(np.float32), w.astype(np.float32)
    order = [i for r in range(k // 2) for i in (2 * r + 1, 2 * r)] if dot else range(k)
    for i in order:
        expected += x32[:, i:i + 1] * w32[i]
    for term in extra:
        expected += term.reshape(-1, n)
    np.testing.assert_array_equal(actual[0], expected)


def test_the_vdpbf16ps_kernel_compiles_for_a_cpu_with_it():
    """Where this CPU lacks AVX512_BF16 the test above cannot run it; built for one that has it, it uses it."""
    func = pair_matmul(1024, 192, pair_tile(1024, 192), "bfloat16", bias=True, dot=True)
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=parse_cpu_target("llvm -mcpu=sapphirerapids"))
    assert "vdpbf16ps" in lib.inspect_source("asm")


@pytest.mark.parametrize("lanes", [16, 8])
def test_float32_inputs_against_float64(lanes):
    x, w, _, actual = run(64, 128, 5, "float32", lanes=lanes)
    expected = x[0].astype(np.float64) @ w.astype(np.float64)
    assert rel_max_error(actual[0], expected) < 1e-6


def test_pairs_hold_two_input_features_of_a_column_side_by_side():
    w = np.arange(6 * 24, dtype=np.float32).reshape(6, 24).astype(ml_dtypes.bfloat16)
    p = paired(w)
    assert p.shape == (3, 3, 8, 2) and pair_tile(6, 24) == 8  # 24 columns: tiles of 8
    tile, pair_row, column = 1, 2, 5
    assert p[tile, pair_row, column, 0] == w[2 * pair_row, tile * 8 + column]
    assert p[tile, pair_row, column, 1] == w[2 * pair_row + 1, tile * 8 + column]
    np.testing.assert_array_equal(p.transpose(1, 3, 0, 2).reshape(6, 24), w)


def test_weights_that_do_not_pair_stay_in_column_tiles():
    plan = LayoutPlan("column-pairs", "column-pairs", bf16_dot=True)
    assert plan.layout_for("h.0.w_in", 48, 216).name == COLUMN_PAIRS.name
    assert plan.layout_for("h.0.w_in", 48, 216).dot  # the plan's instructions reach the layout
    assert plan.layout_for("h.0.w_in", 47, 216) is COLUMN_TILES  # odd input features
    assert plan.layout_for("lm_head", 48, 180) is COLUMN_TILES  # no tile of 8 or more columns
    assert COLUMN_TILES.for_shape(48, 216, plan) is COLUMN_TILES


@pytest.mark.parametrize("name", ["bfloat16", "odd-bf16"])
def test_bfloat16_artifact_decodes_step_by_step_like_the_reference(name, artifact, generator, reference):
    meta = ArtifactMetadata.read(artifact(name))
    assert meta.layouts["blocks"] == COLUMN_PAIRS.name and meta.prefill_buckets == {}
    gen = generator(name)
    ids = prompt_for(gen)
    expected = reference(name).logits(ids)
    logits, cache = gen.forward("prefill", ids[:5], gen.new_cache(), 5)
    steps = [logits[0]]
    for n in range(5, len(ids)):
        logits, cache = gen.forward("decode", [ids[n]], cache, n + 1)
        steps.append(logits[0])
    assert rel_max_error(np.stack(steps), expected[4:]) < TOLERANCE[name]


def test_bfloat16_cpu_artifacts_pair_unless_tuned():
    from gptj_tvm.compiler.build import variant_for

    target = host_target()
    assert variant_for(target, "bfloat16").layouts.blocks == COLUMN_PAIRS.name
    assert variant_for(target, "bfloat16").layouts.bf16_dot == has_avx512_bf16()  # where this CPU has it
    # the target's ISA, not the host's, picks the instructions and the blocks
    haswell, zen4 = (variant_for(parse_cpu_target(f"llvm -mcpu={cpu}"), "bfloat16").layouts
                     for cpu in ("haswell", "znver4"))
    assert (haswell.bf16_dot, haswell.vector_bits, zen4.bf16_dot, zen4.vector_bits) == (False, 256, True, 512)
    # MetaSchedule tunes the column-tile GEMMs: a tuning database compiles those
    assert variant_for(target, "bfloat16", tuned=True).layouts.blocks == COLUMN_TILES.name
    assert variant_for(target, "float32").layouts == variant_for(target, "float16").layouts
    assert variant_for(target, "float32").layouts.blocks == COLUMN_TILES.name
