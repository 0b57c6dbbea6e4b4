"""The compile pipeline's graph passes, checked on the IR before and after each."""

from __future__ import annotations

import dataclasses
import re

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


def test_lay_out_linears_swaps_each_linear_for_its_planned_layout():
    """Before: every linear in column tiles ([out / t, in, t] weights, one `matmul`). After a q4 plan: the blocks'
    linears hold q4 levels and scales and lm_head q8 (a weight and a scale each, `quantized_matmul`); after a
    column-pair plan, every linear of the tiny model pairs, and where W_in's columns take no pair tile (48 x 180)
    it falls back to column tiles."""
    from gptj_tvm.frontend.layouts import LayoutPlan
    from gptj_tvm.ir.linear_layouts import lay_out_linears

    model = merge_block_projections(GPTJ(CONFIG, "float32"))
    before, before_params = export(model)
    d, vocab = CONFIG.n_embd, CONFIG.padded_vocab_size

    def gemms(mod):  # kernel names without the numbers that tell same-named kernels apart
        return [re.sub(r"\d+$", "", c) for c in kernel_calls(mod) if "matmul" in c]

    assert [p for p in before_params if "scale" in p] == []
    assert gemms(before) == ["matmul"] * (2 * CONFIG.n_layer + 1)

    quantized = lay_out_linears(merge_block_projections(GPTJ(CONFIG, "float32")), LayoutPlan("q4", "q8"))
    assert [(m.layout.name) for m in (quantized.h[0].w_in, quantized.h[0].w_out, quantized.lm_head)] == \
        ["q4", "q4", "q8"]
    after, after_params = export(quantized)
    assert after_params == [p for name in before_params
                            for p in ([name, name.replace(".weight", ".scale")] if name.endswith(("w_in.weight",
                                      "w_out.weight", "lm_head.weight")) else [name])]
    assert [int(s) for s in quantized.lm_head.weight.shape] == [vocab // 64, d // 4, 64, 4]  # q8: 4 per word
    assert [int(s) for s in quantized.h[0].w_in.weight.shape] == [(4 * d + 3 * d) // 64, d // 8, 64, 4]  # q4: 8
    assert [int(s) for s in quantized.h[0].w_in.scale.shape] == [(4 * d + 3 * d) // 64, d // 32, 64]
    assert gemms(after) == ["quantized_matmul"] * (2 * CONFIG.n_layer + 1)

    paired = lay_out_linears(merge_block_projections(GPTJ(CONFIG, "bfloat16")),
                             LayoutPlan("column-pairs", "column-pairs"))
    assert {paired.h[0].w_in.layout.name, paired.h[0].w_out.layout.name, paired.lm_head.layout.name} == \
        {"column-pairs"}
    assert [int(s) for s in paired.h[0].w_out.weight.shape] == [d // 64, (d + 4 * d) // 2, 64, 2]
    assert gemms(export(paired)[0]) == ["pair_matmul"] * (2 * CONFIG.n_layer + 1)
    odd = dataclasses.replace(CONFIG, n_embd=48, n_head=3, rotary_dim=6, n_inner=36)
    pairs = LayoutPlan("column-pairs", "column-pairs")
    fallback = lay_out_linears(merge_block_projections(GPTJ(odd, "bfloat16")), pairs)
    assert [m.layout.name for m in (fallback.h[0].w_in, fallback.h[0].w_out)] == ["column-tiles", "column-pairs"]
    assert gemms(export(fallback)[0])[:2] == ["matmul", "pair_matmul"]
