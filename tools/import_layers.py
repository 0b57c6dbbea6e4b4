#!/usr/bin/env python3
"""The import check `.ci/run` runs: each folder of the package imports only the folders before it in LAYERS (data
flows one way), and runtime/ reaches TVM only through its runtime (tvm.runtime, tvm_ffi), never its compiler.

Reads every file's imports with ast (nothing is run), those inside functions included. Prints each folder's
edges with a count, then what breaks the rules; exit status 1 if anything does.

    python tools/import_layers.py
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gptj_tvm"
LAYERS = ["core", "tir_kernels", "frontend", "ir", "schedules", "targets", "runtime", "compiler", "gptj_tvm"]
RUNTIME_TVM = ("tvm", "tvm.runtime", "tvm_ffi")  # `import tvm` loads only the runtime library with TVM_USE_RUNTIME_LIB


def imported_modules(path: Path) -> list[str]:
    """Absolute module names the file imports (relative imports resolved against its package)."""
    folder = path.parent.relative_to(ROOT).parts
    package = [PACKAGE] + ([] if folder == (PACKAGE,) else list(folder))
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else PACKAGE


def main() -> int:
    edges: Counter = Counter()
    problems = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for module in imported_modules(path):
                target = layer_of(module)
                if target is not None and target != layer:
                    edges[layer, target] += 1
                    if LAYERS.index(target) > LAYERS.index(layer):
                        problems.append(f"{path.relative_to(ROOT)}: {layer} imports {module}, a later layer")
                top = module.split(".")
                if layer == "runtime" and top[0] == "tvm" and ".".join(top[:2]) not in RUNTIME_TVM:
                    problems.append(f"{path.relative_to(ROOT)}: the runtime imports {module}, part of TVM's compiler")
    for (a, b), n in sorted(edges.items(), key=lambda e: (LAYERS.index(e[0][0]), LAYERS.index(e[0][1]))):
        print(f"{a:>10} -> {b:<10} {n}")
    print(f"order: {' < '.join(LAYERS)}")
    for problem in sorted(set(problems)):
        print(f"error: {problem}")
    print("no import against the order" if not problems else f"{len(set(problems))} imports break the rules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
