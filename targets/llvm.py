"""The x86/ARM CPU target: LLVM for a CPU named by -mcpu (default: this host's, detected) with any -mattr
changes, and the ISA features LLVM will emit code for there (which decide the GEMM kernels)."""

from __future__ import annotations

import tvm
from tvm.target import codegen

from gptj_tvm.core.errors import GptjError

from .host import ISA_FLAGS, LLVM_FEATURE, cpu_flags, num_cores


def host_target(cores: int | None = None) -> tvm.target.Target:
    """This host's CPU: the detected -mcpu lets LLVM use every ISA extension it has, less any that CPU model has
    and this one does not show (a hypervisor may hide some), so that an artifact built here runs here."""
    hidden = target_isa(cpu_target(cores=cores)) - cpu_flags() if cpu_flags() else frozenset()
    return cpu_target(mattr=tuple(f"-{LLVM_FEATURE.get(flag, flag)}" for flag in sorted(hidden)), cores=cores)


def cpu_target(mcpu: str | None = None, mattr: tuple[str, ...] = (), cores: int | None = None) -> tvm.target.Target:
    """LLVM for the CPU `mcpu` (None: this host's) with the feature changes `mattr` (+avx2, -avx512f, ...).
    MetaSchedule needs num-cores: this host's (the artifact runs with the threads of the CPU it runs on)."""
    spec: dict = {"kind": "llvm", "mcpu": mcpu or codegen.llvm_get_system_cpu(), "num-cores": cores or num_cores()}
    if mcpu is not None and not codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()):
        raise GptjError(f"-mcpu={mcpu}: LLVM {codegen.llvm_version_major()} knows no such CPU "
                        "(e.g. haswell, znver3, znver4, alderlake, sapphirerapids, skylake-avx512)")
    for change in mattr:
        if change[:1] not in "+-" or len(change) < 2:
            raise GptjError(f"-mattr={change}: each feature change is +NAME or -NAME (e.g. +avx2,-avx512f)")
    if mattr:
        spec["mattr"] = list(mattr)
    target = tvm.target.Target(spec)
    unknown = [c for c in mattr if not codegen.target_has_features(c[1:], target) and c[0] == "+"]
    if unknown:
        raise GptjError(f"-mattr: LLVM knows no CPU feature {', '.join(c[1:] for c in unknown)}")
    return target


def parse_cpu_target(text: str) -> tvm.target.Target:
    """`llvm`, `llvm -mcpu=NAME`, `llvm -mattr=+a,-b`, `llvm -num-cores=N` (as TVM's old target strings) -> the
    target, or one clear error."""
    words = text.split()
    mcpu, mattr, cores = None, (), None
    for word in words[1:]:
        key, _, value = word.lstrip("-").partition("=")
        if not value:
            raise GptjError(f"--target {text!r}: {word!r} is not -mcpu=NAME, -mattr=+F,-F or -num-cores=N")
        if key == "mcpu":
            mcpu = value
        elif key == "mattr":
            mattr = tuple(v for v in value.split(",") if v)
        elif key == "num-cores" and value.isdigit() and int(value) > 0:
            cores = int(value)
        else:
            raise GptjError(f"--target {text!r}: {word!r} is not -mcpu=NAME, -mattr=+F,-F or -num-cores=N")
    if mcpu is None and not mattr:
        return host_target(cores)
    return cpu_target(mcpu, mattr, cores)


def target_isa(target: tvm.target.Target) -> frozenset[str]:
    """The ISA extensions of ISA_FLAGS (named as /proc/cpuinfo names them) that LLVM emits code for on target:
    what a CPU needs to run its artifact, and what decides its GEMM kernels."""
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return frozenset(flag for flag in ISA_FLAGS if LLVM_FEATURE.get(flag, flag) in features)
