"""What this host's CPU is, read without TVM's compiler (the runtime checks artifacts against it)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# ISA extensions that change the code LLVM emits for a -mcpu; an artifact needs all it was built with.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512_bitalg", "avx512_vpopcntdq",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "sve2",
)
# How LLVM names the flags whose name differs from /proc/cpuinfo's (targets/llvm.target_isa)
LLVM_FEATURE = {
    "sse4_2": "sse4.2", "avx512_vbmi2": "avx512vbmi2", "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16", "avx512_bitalg": "avx512bitalg", "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx_vnni": "avxvnni", "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8", "asimd": "neon",
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_features() -> list[str]:
    """The ISA extensions from ISA_FLAGS this CPU has, sorted."""
    return sorted(cpu_flags() & set(ISA_FLAGS))


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_fingerprint() -> dict:
    return {"cpu": cpu_model(), "machine": platform.machine(), "isa": isa_features()}


def has_vnni(isa=None) -> bool:
    """AVX-512 VNNI (vpdpbusd on 512-bit registers) in isa (default: this CPU's flags)."""
    return {"avx512f", "avx512_vnni"} <= (cpu_flags() if isa is None else set(isa))


def has_avx512_bf16(isa=None) -> bool:
    """AVX512_BF16 (vdpbf16ps on 512-bit registers) in isa (default: this CPU's flags)."""
    return {"avx512f", "avx512_bf16"} <= (cpu_flags() if isa is None else set(isa))
