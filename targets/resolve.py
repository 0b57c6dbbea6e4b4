"""Turn a user's --target into a TVM target, or one clear error."""

from __future__ import annotations

import tvm

from gptj_tvm.errors import GptjError

KNOWN = ("llvm",)


def resolve_target(name: str) -> tvm.target.Target:
    kind = name.split()[0] if name else ""
    if kind == "llvm":
        from .llvm import host_target  # noqa: PLC0415

        return host_target()
    raise GptjError(f"unknown target {name!r}: this build knows {', '.join(KNOWN)}")
