"""The compile pipeline, phase by phase, in order.

`tvm.compile` on llvm neither fuses nor schedules, so the project states every phase here:
    0. model         on the nn.Module, before export: merge_block_projections (ir/merge_projections.py), then
                     lay_out_linears (ir/linear_layouts.py): each linear in its compiled layout
    1. legalize      Relax operators -> TIR PrimFuncs
    2. fuse          annotate op patterns, fold constants, then FuseOps + FuseTIR: each GEMM takes its
                     epilogue (bias, gelu_new, residual add, casts) into one kernel
    3. schedule      every kernel gets a schedule for the target (`gptj_tvm.schedules`)
    4. lower         dataflow -> VM calls, static memory planning, shape lowering, global symbols
The weights are already stored in the kernels' layout (frontend/weights.py), so no phase transposes or
concatenates a weight at run time. Rotary + KV-cache append and attention are single TIR kernels written in
tir_kernels/attention.py; LayerNorm stays a kernel of its own (fusing it into the W_in GEMV would need its
statistics before the first column tile).
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax

from gptj_tvm.frontend.layouts import LayoutPlan

ScheduleFn = Callable[[tvm.IRModule], tvm.IRModule]


def model_passes(fuse_block: bool, plan: LayoutPlan) -> Callable:
    """Phase 0, on the nn.Module: the block's projections merged (or the plain graph, for comparison), then
    every linear laid out as `plan` says."""
    from .linear_layouts import lay_out_linears
    from .merge_projections import merge_block_projections

    def passes(model):
        model = merge_block_projections(model) if fuse_block else model
        return lay_out_linears(model, plan)

    return passes


def legalize_passes() -> list[tvm.transform.Pass]:
    return [relax.transform.LegalizeOps()]


def fusion_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def lowering_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def kernel_calls(mod: tvm.IRModule, function: str) -> list[str]:
    """Names of the PrimFuncs a Relax function calls (call_tir and call_tir_inplace), in order, with repeats."""
    calls = []
    for block in mod[function].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
                calls.append(value.args[0].name_hint)
    return calls


def optimize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Phases 1-2: the fused, legalized module whose PrimFuncs are the kernels to schedule (or tune)."""
    with target:
        return tvm.transform.Sequential(legalize_passes() + fusion_passes())(mod)


def lower(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Phase 4: a scheduled module -> what the VM runs."""
    with target:
        return tvm.transform.Sequential(lowering_passes())(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target, schedule: ScheduleFn) -> tvm.runtime.Executable:
    """All phases, then code generation for `target`."""
    mod = optimize(mod, target)
    mod = schedule(mod)
    mod = lower(mod, target)
    return tvm.compile(mod, target=target, relax_pipeline=None)
