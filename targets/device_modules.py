"""The device code a compiled library carries: the modules of one kind it imports (CUDA, WebGPU)."""

from __future__ import annotations


def device_modules(module, kind: str) -> list:
    """The modules of `kind` ("cuda", "webgpu") a compiled module imports, at any depth."""
    found, pending = [], list(module.imports)
    while pending:
        m = pending.pop()
        if m.kind == kind:
            found.append(m)
        pending.extend(m.imports)
    return found
