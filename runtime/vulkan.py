"""Vulkan GPUs: run the kernels of a `--target vulkan` artifact through wgpu, on its Vulkan backend only.

TVM's pip wheel has no Vulkan code generator, so `--target vulkan` compiles with TVM's WebGPU one: WGSL
kernels, host code in llvm. wgpu (wgpu-native, bundled in its wheel) turns the WGSL into SPIR-V and runs it on a
Vulkan adapter. TVM's native runtime has no "webgpu" device (its WebGPU runtime is the browser's), so
webgpu_bridge.cc, built at first use with tvm_ffi's C++ builder and cached, registers a device API and a module
loader for it that call the functions here:

- a device pointer is an opaque handle (a multiple of 256) for one wgpu buffer; nothing does arithmetic on it;
- kernels are recorded into one command encoder and submitted when the host needs data (a copy, a sync, a
  free: wgpu aborts the process when a buffer still used by unsubmitted work is destroyed);
- the launch protocol is the one TVM's WebGPU code generator emits: buffers are bindings 0..k-1 (read-only
  unless the kernel's `paramWriteAccess` tag says it writes them), the scalar arguments and `packGridDimX` are
  one uniform struct after them, and a grid wider than 65535 in x is folded into z.

One Vulkan device per process: `select()` opens an adapter, and kernels compile on first launch on it.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptj_tvm.core.blob import BlobReader
from gptj_tvm.core.errors import GptjError

BACKEND = "Vulkan"
BRIDGE_SOURCE = Path(__file__).with_name("webgpu_bridge.cc")
MAX_GRID_X = 65535
HANDLE_STEP = 256  # handles look like aligned pointers to the host code
DL_INT, DL_UINT, DL_FLOAT, DL_HANDLE = 0, 1, 2, 3
ATTR_EXIST, ATTR_MAX_THREADS, ATTR_WARP_SIZE, ATTR_MAX_SHARED, ATTR_DEVICE_NAME = 0, 1, 2, 3, 5
# the limits a model's kernels press on; the device asks for all the adapter has
LIMITS = ("max-storage-buffers-per-shader-stage", "max-storage-buffer-binding-size", "max-buffer-size",
          "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
          "max-compute-workgroup-size-x", "max-compute-workgroups-per-dimension")


def _wgpu():
    try:
        import wgpu
        import wgpu.backends.wgpu_native
    except ImportError as err:
        raise GptjError(f"running on Vulkan needs the wgpu package ({err}): pip install wgpu") from None
    return wgpu


_adapters = None


def adapters() -> list:
    """The Vulkan adapters wgpu sees (lavapipe, the CPU driver, included), in a fixed order."""
    global _adapters  # the instance is created once per process
    if _adapters is None:
        wgpu = _wgpu()
        from wgpu.backends.wgpu_native import extras

        try:
            extras.set_instance_extras(backends=[BACKEND])  # no GL/Metal/DX12 adapters: the target means Vulkan
        except Exception:  # noqa: BLE001  (the instance already exists: filter below instead)
            pass
        # Mesa's Vulkan drivers probe for a Wayland display while the instance is created and print an error
        # per driver when XDG_RUNTIME_DIR is unset (as in containers and CI); any folder keeps them quiet
        unset = "XDG_RUNTIME_DIR" not in os.environ
        if unset:
            os.environ["XDG_RUNTIME_DIR"] = tempfile.gettempdir()
        try:
            found = wgpu.gpu.enumerate_adapters_sync()
        except Exception:  # noqa: BLE001  (no Vulkan loader or ICD: no adapters)
            found = []
        finally:
            if unset:
                del os.environ["XDG_RUNTIME_DIR"]
        _adapters = [a for a in found if a.info.get("backend_type") == BACKEND]
    return _adapters


def describe(adapter) -> dict:
    info = adapter.info
    return {"name": info.get("device", ""), "type": info.get("adapter_type", ""),
            "driver": info.get("description", ""), "vendor": info.get("vendor", ""),
            "features": sorted(adapter.features)}


def max_buffer_bytes(index: int) -> int:
    """The largest buffer a kernel can bind on adapter `index` (lavapipe: 128 MiB; desktop GPUs: 2-4 GiB)."""
    limits = adapters()[index].limits
    return min(limits["max-storage-buffer-binding-size"], limits["max-buffer-size"])


def pick_adapter(name: str | None = None) -> int:
    """The index of the first Vulkan adapter, or of the one whose index or name (a substring) is `name`."""
    found = adapters()
    if not found:
        raise GptjError("no Vulkan adapter found: install a Vulkan driver (and the Vulkan loader, libvulkan1); "
                        "on a machine without a GPU, Mesa's lavapipe (apt-get install mesa-vulkan-drivers)")
    if name is None:
        return 0
    if name.isdigit() and int(name) < len(found):
        return int(name)
    for i, adapter in enumerate(found):
        if name.lower() in describe(adapter)["name"].lower():
            return i
    names = ", ".join(f"{i}: {describe(a)['name']}" for i, a in enumerate(found))
    raise GptjError(f"no Vulkan adapter {name!r}; this machine has {names}")


@dataclass
class _Kernel:
    name: str
    source: str
    arg_codes: list[int]  # DLPack type code per argument (int, uint, float, handle)
    dims: list[int]  # per launch parameter: 0-2 blockIdx.xyz, 3-5 threadIdx.xyz
    writes: list[int]  # per buffer argument: 1 if the kernel writes it
    pipeline: object = None
    layout: object = None


class _Gpu:
    """One wgpu device on a Vulkan adapter, with the buffers TVM allocated on it."""

    def __init__(self, index: int):
        wgpu = _wgpu()
        self.wgpu = wgpu
        self.adapter = adapters()[index]
        features = [f for f in ("shader-f16",) if f in self.adapter.features]
        limits = {k: self.adapter.limits[k] for k in LIMITS}
        self.device = self.adapter.request_device_sync(required_features=features, required_limits=limits)
        self.buffers: dict[int, object] = {}
        self.next_handle = HANDLE_STEP
        self.encoder = None

    def alloc(self, nbytes: int) -> int:
        usage = self.wgpu.BufferUsage.STORAGE | self.wgpu.BufferUsage.COPY_SRC | self.wgpu.BufferUsage.COPY_DST
        buffer = self.device.create_buffer(size=max(4, -(-nbytes // 4) * 4), usage=usage)
        handle, self.next_handle = self.next_handle, self.next_handle + HANDLE_STEP
        self.buffers[handle] = buffer
        return handle

    def free(self, handle: int) -> None:
        self.flush()
        self.buffers.pop(handle).destroy()

    def flush(self) -> None:
        if self.encoder is not None:
            self.device.queue.submit([self.encoder.finish()])
            self.encoder = None

    def sync(self) -> None:
        self.flush()
        # wgpu 0.32's queue.on_submitted_work_done_sync() fails in its C binding; a blocking poll waits for
        # everything submitted (reads need no sync: mapping their staging buffer waits for the copy)
        self.device._poll_wait()

    def copy_to_device(self, host: int, handle: int, offset: int, nbytes: int) -> None:
        self.flush()  # recorded kernels run before this write, as they were issued
        _check_aligned(offset)
        data = (ctypes.c_ubyte * nbytes).from_address(host)
        if nbytes % 4:  # wgpu writes whole words; the allocation was padded for this
            data = bytes(data) + bytes(4 - nbytes % 4)
        self.device.queue.write_buffer(self.buffers[handle], offset, data)

    def copy_from_device(self, handle: int, offset: int, host: int, nbytes: int) -> None:
        _check_aligned(offset)
        padded = -(-nbytes // 4) * 4
        usage = self.wgpu.BufferUsage.MAP_READ | self.wgpu.BufferUsage.COPY_DST
        staging = self.device.create_buffer(size=padded, usage=usage)
        self._encoder().copy_buffer_to_buffer(self.buffers[handle], offset, staging, 0, padded)
        self.flush()
        staging.map_sync(self.wgpu.MapMode.READ)
        mapped = np.frombuffer(staging.read_mapped(copy=False), dtype=np.uint8)  # a read-only view
        ctypes.memmove(host, mapped.ctypes.data, nbytes)  # straight from the mapping
        staging.unmap()
        staging.destroy()

    def copy_within(self, src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
        _check_aligned(src_offset, dst_offset, nbytes)
        self._encoder().copy_buffer_to_buffer(self.buffers[src], src_offset, self.buffers[dst], dst_offset, nbytes)

    def _encoder(self):
        if self.encoder is None:
            self.encoder = self.device.create_command_encoder()
        return self.encoder

    def launch(self, kernel: _Kernel, args) -> None:
        if kernel.pipeline is None:
            self._build(kernel)
        try:
            self._dispatch(kernel, args)
        except Exception as err:  # noqa: BLE001  (wgpu's validation errors span many lines: keep them on one)
            raise GptjError(f"Vulkan kernel {kernel.name} failed on {describe(self.adapter)['name']}: "
                            f"{one_line(err)}") from None

    def _dispatch(self, kernel: _Kernel, args) -> None:
        n_values = len(kernel.arg_codes)
        work = [1] * 6
        for dim, extent in zip(kernel.dims, args[n_values:]):
            work[dim] = int(extent)
        packed_x = work[0]
        while work[0] > MAX_GRID_X:  # TVM's kernels rebuild blockIdx.x from (z, x) and skip the padding
            work[0], work[2] = (work[0] + 1) // 2, work[2] * 2
        buffers, pods = [], []
        for code, value in zip(kernel.arg_codes, args[:n_values]):
            if code == DL_HANDLE:
                buffers.append(self.buffers[_handle(value)])
            elif code == DL_FLOAT:
                pods.append(struct.pack("<f", float(value)))
            else:
                pods.append(struct.pack("<i" if code == DL_INT else "<I", int(value)))
        pods.append(struct.pack("<I", packed_x))
        uniform = b"".join(pods) + bytes(-4 * len(pods) % 16)
        pod_buffer = self.device.create_buffer_with_data(data=uniform, usage=self.wgpu.BufferUsage.UNIFORM)
        entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
                   for i, b in enumerate(buffers)]
        entries.append({"binding": len(buffers), "resource": {"buffer": pod_buffer, "offset": 0,
                                                               "size": len(uniform)}})
        bind_group = self.device.create_bind_group(layout=kernel.layout, entries=entries)
        compute = self._encoder().begin_compute_pass()
        compute.set_pipeline(kernel.pipeline)
        compute.set_bind_group(0, bind_group)
        compute.dispatch_workgroups(work[0], work[1], work[2])
        compute.end()

    def _build(self, kernel: _Kernel) -> None:
        wgpu = self.wgpu
        n_buffers = len(kernel.writes)
        entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": "storage" if kernel.writes[i] else "read-only-storage"}}
                   for i in range(n_buffers)]
        entries.append({"binding": n_buffers, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": "uniform"}})
        kernel.layout = self.device.create_bind_group_layout(entries=entries)
        layout = self.device.create_pipeline_layout(bind_group_layouts=[kernel.layout])
        try:
            module = self.device.create_shader_module(code=kernel.source)
            kernel.pipeline = self.device.create_compute_pipeline(
                layout=layout, compute={"module": module, "entry_point": kernel.name})
        except Exception as err:  # noqa: BLE001  (wgpu reports WGSL and pipeline errors with long diagnostics)
            raise GptjError(f"Vulkan kernel {kernel.name} does not compile on {describe(self.adapter)['name']}: "
                            f"{one_line(err)}") from None


def one_line(err: Exception) -> str:
    """A wgpu error (a headline, then "Caused by:" and the details) on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and line.strip() != "Caused by:"]
    return " / ".join(lines)[:400] or type(err).__name__


def _check_aligned(*values: int) -> None:
    if any(v % 4 for v in values):
        raise GptjError("Vulkan copies must start at a multiple of 4 bytes")


def _handle(value) -> int:
    return value if isinstance(value, int) else (value.value or 0)


def parse_module(blob: bytes) -> dict[str, _Kernel]:
    """A "webgpu" module as TVM's code generator serializes it: the function table, then {name: WGSL}."""
    read = BlobReader(blob)
    table = read.function_table()
    sources = {}
    for _ in range(read.u64()):
        name = read.string()
        sources[name] = read.string()
    kernels = {}
    for name, (arg_types, tags) in table.items():
        dims, writes = [], []
        for tag in tags:
            if tag.startswith(("blockIdx.", "threadIdx.")):
                dims.append("xyz".index(tag[-1]) + (3 if tag.startswith("threadIdx.") else 0))
            elif tag.startswith("paramWriteAccess:"):
                writes = [int(x) for x in re.findall(r"\d+", tag[len("paramWriteAccess:"):])]
            else:
                raise GptjError(f"kernel {name}: unknown launch parameter {tag!r}")
        codes = [t[0] for t in arg_types]
        if len(writes) != codes.count(DL_HANDLE):
            writes = [1] * codes.count(DL_HANDLE)
        kernels[name] = _Kernel(name, _fix_grid_guard(sources[name]), codes, dims, writes)
    return kernels


def _fix_grid_guard(source: str) -> str:
    # TVM's WebGPU code generator guards a folded grid with `index > packGridDimX`, letting the one block past
    # the end run (only when x was folded into z with padding); the block index must stay below it
    return source.replace("> podArgs.packGridDimX) { return; }", ">= podArgs.packGridDimX) { return; }")


class _Bridge:
    def __init__(self):
        self.gpus: dict[int, _Gpu] = {}
        self.modules: list[dict[str, _Kernel]] = []
        self.active: int | None = None

    def gpu(self, index: int) -> _Gpu:
        if index not in self.gpus:
            if self.active is not None and self.active != index:
                raise GptjError("one Vulkan adapter per process: this one already runs on adapter "
                                f"{self.active}")
            self.gpus[index] = _Gpu(index)
            self.active = index
        return self.gpus[index]

    def attr(self, index: int, kind: int):
        if kind == ATTR_EXIST:
            return int(index < len(adapters()))
        if index >= len(adapters()):
            return None
        if kind == ATTR_DEVICE_NAME:
            return describe(adapters()[index])["name"]
        limits = adapters()[index].limits
        return {ATTR_MAX_THREADS: limits.get("max-compute-invocations-per-workgroup"), ATTR_WARP_SIZE: 1,
                ATTR_MAX_SHARED: limits.get("max-compute-workgroup-storage-size")}.get(kind)

    def load_module(self, blob) -> int:
        self.modules.append(parse_module(bytes(blob)))
        return len(self.modules) - 1

    def get_function(self, module: int, name: str):
        import tvm_ffi

        kernel = self.modules[module].get(name)
        if kernel is None:
            return None

        def launch(*args):
            self.gpu(self.active or 0).launch(kernel, args)

        return tvm_ffi.convert(launch)


_bridge: _Bridge | None = None


def enable() -> None:
    """Make TVM's runtime able to load and run webgpu artifacts in this process (idempotent)."""
    global _bridge
    if _bridge is not None:
        return
    import tvm_ffi

    bridge = _Bridge()
    callbacks = {
        "attr": bridge.attr,
        "alloc": lambda dev, nbytes: bridge.gpu(dev).alloc(nbytes),
        "free": lambda dev, handle: bridge.gpu(dev).free(handle),
        "sync": lambda dev: bridge.gpu(dev).sync(),
        "copy_to_device": lambda dev, host, handle, offset, n: bridge.gpu(dev).copy_to_device(host, handle, offset, n),
        "copy_from_device": lambda dev, handle, offset, host, n: bridge.gpu(dev).copy_from_device(handle, offset,
                                                                                                   host, n),
        "copy_within": lambda dev, *args: bridge.gpu(dev).copy_within(*args),
        "load_module": bridge.load_module,
        "get_function": bridge.get_function,
    }
    for name, fn in callbacks.items():
        tvm_ffi.register_global_func(f"gptj_tvm.webgpu.{name}", fn, override=True)
    ctypes.CDLL(_build_bridge(), mode=ctypes.RTLD_GLOBAL)
    _bridge = bridge


def select(index: int) -> None:
    """Open adapter `index` for this process's Vulkan work."""
    enable()
    _bridge.gpu(index)


def _build_bridge() -> str:
    import tvm  # the runtime package: its headers and libtvm_runtime
    import tvm_ffi.cpp

    root = Path(tvm.__file__).parent
    include = root / "include"
    lib = root / "lib"
    if not (include / "tvm" / "runtime" / "device_api.h").is_file():
        raise GptjError(f"running on Vulkan needs TVM's C++ headers, not found under {include}")
    try:
        return tvm_ffi.cpp.build("gptj_tvm_webgpu_bridge", sources=[str(BRIDGE_SOURCE)],
                                 extra_include_paths=[str(include)],
                                 extra_ldflags=[f"-L{lib}", "-ltvm_runtime", f"-Wl,-rpath,{lib}"])
    except Exception as err:  # noqa: BLE001  (compiler missing or failing: one line)
        lines = [line.strip() for line in str(err).strip().splitlines()]
        why = next((line for line in lines if "error" in line), lines[-1] if lines else type(err).__name__)
        raise GptjError(f"cannot build the Vulkan bridge (needs a C++ compiler and ninja): {why}") from None
