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


def has_vnni() -> bool:
    """AVX-512 VNNI (vpdpbusd on 512-bit registers): the quantized GEMMs' integer dot products."""
    return {"avx512f", "avx512_vnni"} <= cpu_flags()


def has_avx512_bf16() -> bool:
    """AVX512_BF16 (vdpbf16ps on 512-bit registers): the bfloat16 pair GEMMs' dot products."""
    return {"avx512f", "avx512_bf16"} <= cpu_flags()

