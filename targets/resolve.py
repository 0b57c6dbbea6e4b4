"""Turn a user's --target into a TVM target, or one clear error."""

from __future__ import annotations

import json

import tvm

from gptj_tvm.errors import GptjError

from .host import cpu_fingerprint

KNOWN = ("llvm",)


def resolve_target(name: str) -> tvm.target.Target:
    kind = name.split()[0] if name else ""
    if kind == "llvm":
        from .llvm import host_target  # noqa: PLC0415

        return host_target()
    raise GptjError(f"unknown target {name!r}: this build knows {', '.join(KNOWN)}")


def tuning_fingerprint(target: tvm.target.Target, dtype: str) -> dict:
    """What a tuned schedule depends on: the hardware, the exact target and the dtype."""
    hardware = cpu_fingerprint() if target.kind.name == "llvm" else {"kind": target.kind.name}
    return {**hardware, "target": json.loads(str(target)), "dtype": dtype}
