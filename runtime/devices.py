"""`gptj-tvm devices`: the GPUs this machine offers artifacts, Vulkan adapters and CUDA GPUs."""

from __future__ import annotations

import tvm

from gptj_tvm.core.errors import GptjError


def vulkan_devices() -> list[dict]:
    from . import vulkan

    try:
        found = vulkan.adapters()
    except GptjError:  # wgpu missing: no Vulkan from here
        return []
    return [{"index": i, **{k: v for k, v in vulkan.describe(a).items() if k != "features"},
             "shader_f16": "shader-f16" in a.features} for i, a in enumerate(found)]


def cuda_devices() -> list[dict]:
    found = []
    try:
        while tvm.cuda(len(found)).exist:
            device = tvm.cuda(len(found))
            found.append({"index": len(found), "name": device.device_name,
                          "compute_capability": device.compute_version})
    except Exception:  # noqa: BLE001  (no CUDA driver or runtime library: no CUDA GPUs)
        pass
    return found


def list_devices() -> dict[str, list[dict]]:
    return {"vulkan": vulkan_devices(), "cuda": cuda_devices()}
