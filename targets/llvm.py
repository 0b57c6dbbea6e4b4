"""The x86/ARM CPU target: LLVM for this host's CPU (detected -mcpu and number of cores)."""

from __future__ import annotations

import tvm
from tvm.target import codegen

from .host import num_cores


def host_target(cores: int | None = None) -> tvm.target.Target:
    # MetaSchedule needs num-cores; the detected -mcpu lets LLVM use every ISA extension this CPU has.
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                              "num-cores": cores or num_cores()})
