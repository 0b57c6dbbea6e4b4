"""Default schedules: for every kernel without one, the first rule that applies (dlight-style rules)."""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl

from .cpu_matmul import CPUMatmul
from .cpu_quant import CPUQuantMatmul
from .database import workload_module

HAND_WRITTEN = "hand-written"
UNSCHEDULED = "unscheduled"


def cpu_rules() -> list:
    # dlight's cpu.Reduction is left out: it made a 4096-wide LayerNorm 20 ms instead of 0.01 ms unscheduled.
    # dlight's cpu.GEMV is left out too: it only takes [out, in] weights, which CPU artifacts never have (only
    # the GPU variant compiled for a CPU, in tests), and LLVM took 240 s on one tiny GEMV it had scheduled.
    return [CPUQuantMatmul(), CPUMatmul()]


def gpu_rules() -> list:
    # MLC-LLM's default order: the first rule that matches a kernel schedules it; Fallback binds the rest
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def rules_for(target: tvm.target.Target) -> list:
    if target.kind.name == "llvm":
        return cpu_rules()
    if "gpu" in target.keys:
        return gpu_rules()
    raise ValueError(f"no default schedule rules for target kind {target.kind.name!r}")


TUNED = "tuned"


def schedule_kernels(mod: tvm.IRModule, target: tvm.target.Target,
                            tuned=None) -> tuple[tvm.IRModule, dict[str, str]]:
    """A new module with every unscheduled PrimFunc scheduled: from `tuned` (a MetaSchedule database) where it
    has the kernel, else by the first default rule that takes it; and {kernel name: "tuned" |
    "default <Rule>" | "hand-written" | "unscheduled"} saying what each kernel got."""
    rules = rules_for(target)
    functions, report = {}, {}
    with target:
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                functions[gv] = func
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                functions[gv], report[gv.name_hint] = func, HAND_WRITTEN
                continue
            functions[gv], report[gv.name_hint] = func, UNSCHEDULED
            sch = tuned.query_schedule(workload_module(func), target, workload_name="main") if tuned else None
            if sch is not None:
                tuned_func = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
                functions[gv], report[gv.name_hint] = tuned_func, TUNED
                continue
            for rule in rules:
                sch = rule.apply(func, target, False)
                if sch is not None:
                    scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    functions[gv], report[gv.name_hint] = scheduled, f"default {type(rule).__name__}"
                    break
    return tvm.IRModule(functions, attrs=mod.attrs), report
