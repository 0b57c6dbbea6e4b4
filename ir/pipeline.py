"""The compile pipeline, phase by phase, in order.

`tvm.compile` on llvm neither fuses nor schedules, so the project states every phase here:
    1. legalize      Relax operators -> TIR PrimFuncs
    2. fuse          annotate op patterns, fold constants, fuse producers into consumers, merge fused TIR
    3. schedule      every kernel gets a schedule for the target (`gptj_tvm.schedules`)
    4. lower         dataflow -> VM calls, static memory planning, shape lowering, global symbols
The weights are already stored [in, out] (see frontend/weights.py), so no phase transposes a weight at run time.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax

ScheduleFn = Callable[[tvm.IRModule], tvm.IRModule]


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
