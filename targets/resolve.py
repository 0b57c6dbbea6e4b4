"""Turn a user's --target into a TVM target, or one clear error."""

from __future__ import annotations

import json

import tvm

from gptj_tvm.core.errors import GptjError

from .host import cpu_fingerprint

KNOWN = ("llvm", "cuda", "vulkan")


def resolve_target(name: str, arch: str | None = None) -> tvm.target.Target:
    kind = name.split()[0] if name and name.split() else ""
    if arch is not None and kind != "cuda":
        raise GptjError(f"--arch is for --target cuda, not {name!r}")
    if kind == "llvm":  # this host's CPU, or the -mcpu / -mattr given
        from .llvm import parse_cpu_target

        return parse_cpu_target(name)
    if kind in ("cuda", "vulkan") and len(name.split()) > 1:
        raise GptjError(f"--target {name!r}: options are for llvm targets (llvm -mcpu=NAME -mattr=+F,-F)")
    if kind == "cuda":
        from .cuda import cuda_target

        return cuda_target(arch)
    if kind == "vulkan":
        from .vulkan import vulkan_target

        return vulkan_target()
    raise GptjError(f"unknown target {name!r}: this build knows {', '.join(KNOWN)}")


def is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in target.keys


def device_name(target: tvm.target.Target) -> str:
    """The runtime's device for an artifact built for target ("cpu", "cuda", "vulkan")."""
    return {"llvm": "cpu", "webgpu": "vulkan"}.get(target.kind.name, target.kind.name)


def tuning_fingerprint(target: tvm.target.Target, dtype: str) -> dict:
    """What a tuned schedule depends on: the hardware, the exact target and the dtype."""
    hardware = cpu_fingerprint() if target.kind.name == "llvm" else {"kind": target.kind.name}
    return {**hardware, "target": json.loads(str(target)), "dtype": dtype}
