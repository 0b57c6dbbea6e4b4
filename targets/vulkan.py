"""Vulkan GPUs: TVM's WebGPU code generator (WGSL kernels, host code in llvm), run by wgpu on Vulkan.

The pip wheel of TVM is built without its Vulkan/SPIR-V code generator; its WebGPU one is there, and wgpu turns
WGSL into SPIR-V on any Vulkan driver (runtime/vulkan.py). The limits below are WebGPU's defaults, which every
adapter grants: 256 threads per workgroup and 16 KiB of workgroup memory. WGSL has no bfloat16, and float16
needs the adapter's shader-f16 feature (checked when the artifact loads).
"""

from __future__ import annotations

import re

import tvm

from gptj_tvm.core.errors import GptjError

from .device_modules import device_modules

DTYPES = ("float32", "float16")
MAX_THREADS = 256
WORKGROUP_MEMORY_BYTES = 16 << 10


def vulkan_target() -> tvm.target.Target:
    # the host side only launches kernels: plain x86-64 code, so the artifact loads on any host CPU
    return tvm.target.Target({"kind": "webgpu", "max_num_threads": MAX_THREADS,
                              "max_shared_memory_per_block": WORKGROUP_MEMORY_BYTES}, host={"kind": "llvm"})


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise GptjError(f"--target vulkan runs {' or '.join(DTYPES)} (WGSL has no {dtype}): pass --dtype float16")


def required_features(dtype: str) -> list[str]:
    """The wgpu features an adapter needs to run an artifact of this dtype."""
    return ["shader-f16"] if dtype == "float16" else []

STORAGE_BUFFERS = 8  # per shader stage: WebGPU's default limit
_SECTION = re.compile(r"^// Function: (\S+)$", re.M)
_WORKGROUP_ARRAY = re.compile(r"var<workgroup>\s+\w+\s*:\s*array<(\w+),\s*(\d+)>")
_BYTES = {"f32": 4, "i32": 4, "u32": 4, "f16": 2}


def kernel_resources(wgsl: str) -> dict[str, tuple[int, int]]:
    """{kernel: (storage buffers bound, workgroup memory bytes)}, read from the generated WGSL."""
    marks = [(m.start(), m.group(1)) for m in _SECTION.finditer(wgsl)]
    found = {}
    for (start, name), (end, _) in zip(marks, [*marks[1:], (len(wgsl), "")]):
        code = wgsl[start:end]
        memory = sum(_BYTES.get(t, 4) * int(n) for t, n in _WORKGROUP_ARRAY.findall(code))
        buffers, old = found.get(name, (0, 0))  # the generator repeats the heading: sections may be empty
        found[name] = (max(buffers, code.count("var<storage")), max(old, memory))
    return found


def check_limits(compiled) -> None:
    """Every kernel of a compiled module (an Executable or a runtime Module) within the limits any WebGPU
    adapter grants, or one line naming the first that is not."""
    sources = [m.inspect_source() for m in device_modules(getattr(compiled, "mod", compiled), "webgpu")]
    for name, (buffers, memory) in kernel_resources("\n".join(sources)).items():
        if buffers > STORAGE_BUFFERS:
            raise GptjError(f"Vulkan kernel {name} binds {buffers} storage buffers; WebGPU grants {STORAGE_BUFFERS}")
        if memory > WORKGROUP_MEMORY_BYTES:
            raise GptjError(f"Vulkan kernel {name} needs {memory} bytes of workgroup memory; WebGPU grants "
                            f"{WORKGROUP_MEMORY_BYTES}")
