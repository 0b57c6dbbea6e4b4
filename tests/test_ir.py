"""The compile pipeline's graph passes, checked on the IR before and after each."""

from __future__ import annotations

import tvm
from tvm import relax

from gptj_tvm.frontend.config import PRESETS
from gptj_tvm.frontend.model import GPTJ, FusedBlock
from gptj_tvm.ir import pipeline
from gptj_tvm.ir.merge_projections import merge_block_projections
from gptj_tvm.targets.llvm import host_target

CONFIG = PRESETS["tiny"]


def kernel_calls(mod: tvm.IRModule) -> list[str]:
    return pipeline.kernel_calls(mod, "decode")


def export(model: GPTJ):
    mod, params = model.export_tvm(spec=model.get_default_spec())
    return mod, [name for name, _ in params]


def test_merge_block_projections_leaves_two_gemms_per_block():
    before, before_params = export(GPTJ(CONFIG, "float32"))
    model = merge_block_projections(GPTJ(CONFIG, "float32"))
    assert all(isinstance(block, FusedBlock) for block in model.h)
    after, after_params = export(model)
    gemms = lambda mod: [c for c in kernel_calls(mod) if c.startswith("matmul")]  # noqa: E731
    # q, k, v, out_proj, fc_in, fc_out per block, + lm_head  ->  W_in, W_out per block, + lm_head
    assert len(gemms(before)) == 6 * CONFIG.n_layer + 1
    assert len(gemms(after)) == 2 * CONFIG.n_layer + 1
    assert "h.0.attn.q_proj.weight" in before_params and "h.0.w_in.weight" not in before_params
    assert "h.0.attn.q_proj.weight" not in after_params
    assert {"h.1.w_in.weight", "h.1.w_in.bias", "h.1.w_out.weight", "h.1.w_out.bias"} <= set(after_params)


def test_merge_block_projections_refuses_a_model_without_plain_blocks():
    model = merge_block_projections(GPTJ(CONFIG, "float32"))
    try:
        merge_block_projections(model)
    except ValueError as err:
        assert "merged 0 blocks" in str(err)
    else:
        raise AssertionError("merging twice should fail")


def test_fusion_passes_put_each_epilogue_into_its_gemm():
    """After legalize + fuse, a fused decode block is five kernels: LayerNorm, W_in (+ bias), rotary + cache
    append (+ gelu_new), attention, W_out (+ bias + residual)."""
    target = host_target()
    mod, _ = export(merge_block_projections(GPTJ(CONFIG, "bfloat16")))
    with target:
        before = kernel_calls(relax.transform.LegalizeOps()(mod))
    after = kernel_calls(pipeline.optimize(mod, target))
    # reshapes become views when lowered; outside the blocks: embedding, its cast, final LayerNorm, lm_head
    after = [name for name in after if not name.startswith("reshape")]
    assert len(before) >= 2 * len(after)
    assert (len(after) - 4) / CONFIG.n_layer == 5, after
    block = after[2:7]
    assert block[0].startswith("fused_layer_norm")
    assert block[1].startswith("fused_matmul") and "add" in block[1]  # W_in + b_in
    assert block[2:4] == ["rotary_append", "attention"]
    assert block[4].startswith("fused_matmul") and block[4].count("add") == 2  # W_out + b_out + residual
