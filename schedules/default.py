"""Default schedules: dlight's rules for the target, applied to every kernel that has no tuned schedule."""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl

from .cpu_matmul import CPUMatmul


def cpu_rules() -> list:
    # dlight's cpu.Reduction is left out: it made a 4096-wide LayerNorm 20 ms instead of 0.01 ms unscheduled.
    return [CPUMatmul(), dl.cpu.GEMV()]


def rules_for(target: tvm.target.Target) -> list:
    if target.kind.name == "llvm":
        return cpu_rules()
    raise ValueError(f"no default schedule rules for target kind {target.kind.name!r}")


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Returns a new module; dlight changes the module it is given, so it gets a copy."""
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    with target:
        return dl.ApplyDefaultSchedule(*rules_for(target))(mod)
