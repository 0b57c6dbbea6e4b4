"""The runtime needs TVM's runtime only: with a TVM copy that has no compiler, convert a checkpoint's weights
into an artifact compiled without them, and generate from it (what a GPU machine without the compiler does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tvm

import gptj_tvm
from conftest import require_vulkan

SCRIPT = """
import json, sys
import tvm
assert tvm.__file__.startswith(sys.argv[2]), tvm.__file__
import gptj_tvm
from gptj_tvm.cli import main
assert main(["convert-weights", sys.argv[3], sys.argv[1], "--quiet"]) == 0
out = gptj_tvm.load(sys.argv[1]).generate([464, 10730, 29598], max_new_tokens=6)
loaded = sorted(m for m in sys.modules if m.startswith((
    "tvm.relax", "tvm.s_tir", "gptj_tvm.frontend.model", "gptj_tvm.tir_kernels", "gptj_tvm.ir",
    "gptj_tvm.schedules", "gptj_tvm.compiler.build", "gptj_tvm.compiler.compile", "gptj_tvm.targets.cuda",
    "gptj_tvm.targets.vulkan")))
print(json.dumps({"ids": out.ids, "compiler_modules": loaded}))
"""


@pytest.mark.parametrize("target", ["llvm", "vulkan"])
def test_convert_and_generate_with_a_runtime_only_tvm(target, artifact, checkpoint, tmp_path):
    from gptj_tvm.compiler.compile import compile_model

    if target == "vulkan":
        require_vulkan()
    without_weights = tmp_path / "artifact"
    compile_model(checkpoint("tiny"), without_weights, weights=False, progress=False, target=target)
    runtime_copy = tmp_path / "runtime-only"
    # Vulkan builds its small device bridge against TVM's runtime headers at first use: those stay
    dropped = ("libtvm_compiler.so", "3rdparty", "src", "__pycache__") + (("include",) if target == "llvm" else ())
    shutil.copytree(Path(tvm.__file__).parent, runtime_copy / "tvm", ignore=shutil.ignore_patterns(*dropped))
    assert not list(runtime_copy.rglob("libtvm_compiler*"))
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=str(runtime_copy))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(without_weights), str(runtime_copy),
                             str(checkpoint("tiny"))],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compiler_modules"] == []
    expected = gptj_tvm.load(artifact("tiny")).generate([464, 10730, 29598], max_new_tokens=6).ids  # the CPU's
    assert report["ids"] == expected
