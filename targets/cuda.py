"""NVIDIA GPUs: the CUDA target, device code built here with nvcc, and the checks a GPU build needs.

Compiling needs no GPU: `--arch` names the GPU generation (without it, the visible GPU's). TVM's CUDA code
generator keeps CUDA C source in the library (the runtime would need a compiler to load it), so
`export_library` compiles that source with nvcc for the arch and stores the fatbin in the library instead:
loading the artifact then needs the CUDA driver only.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import tvm

from gptj_tvm.core.blob import BlobReader
from gptj_tvm.core.errors import GptjError

from .device_modules import device_modules

ARCH = re.compile(r"^sm_(\d+)([af]?)$")
SHARED_MEMORY_BYTES = 48 << 10  # the static shared memory any CUDA GPU gives a block
LIBRARY_SYMBOL = "__tvm_ffi__library_bin"


def visible_arch() -> str | None:
    """sm_XY of GPU 0, or None when no CUDA GPU is visible (or TVM's CUDA runtime cannot load)."""
    try:
        device = tvm.cuda(0)
        if not device.exist:
            return None
        return "sm_" + device.compute_version.replace(".", "")
    except Exception:  # noqa: BLE001  (no driver, no runtime library: both mean no usable GPU)
        return None


def compute_capability(arch: str) -> int:
    """sm_90a -> 90."""
    match = ARCH.match(arch)
    if not match:
        raise GptjError(f"unknown CUDA arch {arch!r}: expected sm_XY, e.g. sm_80 (A100), sm_89 (L4), sm_90 (H100)")
    return int(match.group(1))


def cuda_target(arch: str | None) -> tvm.target.Target:
    if arch is None:
        arch = visible_arch()
        if arch is None:
            raise GptjError("no CUDA GPU is visible to detect the arch from: pass --arch, e.g. --arch sm_80")
    compute_capability(arch)
    # the host side only launches kernels: plain x86-64 code, so the artifact loads on any host CPU
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": SHARED_MEMORY_BYTES, "thread_warp_size": 32},
                             host={"kind": "llvm"})


def unbound_kernels(mod: tvm.IRModule) -> list[str]:
    """The PrimFuncs of a scheduled module that would run as a single GPU thread (no threadIdx binding).
    TVM has no Python statement visitor here, so the printed TIR is searched for a threadIdx loop."""
    return sorted(gv.name_hint for gv, func in mod.functions.items()
                  if isinstance(func, tvm.tirx.PrimFunc) and 'thread="threadIdx.' not in func.script())


def require_thread_bound(mod: tvm.IRModule) -> None:
    unbound = unbound_kernels(mod)
    if unbound:
        raise GptjError(f"kernel {unbound[0]} has no GPU thread binding and would run as one GPU thread "
                        f"({len(unbound)} such kernels: {', '.join(unbound)}); no schedule rule took it")


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """CUDA C -> a fatbin with machine code for arch and PTX for newer GPUs to JIT from."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise GptjError("nvcc not found: compiling for CUDA needs the CUDA toolkit's nvcc on PATH")
    number = compute_capability(arch)
    suffix = arch[len("sm_"):]
    with tempfile.TemporaryDirectory(prefix="gptj-tvm-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{suffix},code=sm_{suffix}",
               "-gencode", f"arch=compute_{number},code=compute_{number}", "-o", str(out), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise GptjError(f"nvcc failed for {arch}: {lines[-1] if lines else 'no output'}")
        return out.read_bytes()


def export_library(executable, path: Path, arch: str) -> dict:
    """executable.export_library(path), with the CUDA source replaced by its nvcc fatbin for arch.
    Returns {"cuda_source": ..., "fatbin_bytes": ...}."""
    from tvm.runtime import _ffi_api  # compile side only

    info = {}

    def pack_imports(module, is_system_lib, prefix, workspace):
        c_source = _ffi_api.ModulePackImportsToC(module, is_system_lib, prefix)
        found = device_modules(module, "cuda")
        if not found:
            raise GptjError("the compiled library has no CUDA module")
        source = found[0].inspect_source("cuda")
        fatbin = nvcc_fatbin(source, arch)
        info.update(cuda_source=source, fatbin_bytes=len(fatbin))
        out = Path(workspace) / f"{prefix}devc.c"
        out.write_text(_replace_cuda_blob(c_source, source.encode(), fatbin))
        return str(out)

    executable.export_library(str(path), fpack_imports=pack_imports)
    if "fatbin_bytes" not in info:
        raise GptjError("the compiled library has no CUDA kernels to build")
    return info


# The packed imports (tvm-ffi's library blob): u64 payload size; the import tree (row_ptr, child_indices as
# u64 vectors); one u64-length-prefixed kind per module, and for all but "_lib" a length-prefixed blob. A CUDA
# module's blob is [fmt][function table][code], fmt and code length-prefixed strings: the code generator
# writes fmt "cuda" with the source as code; the runtime loads fmt "fatbin" without compiling anything.
def _replace_cuda_blob(c_source: str, source: bytes, fatbin: bytes) -> str:
    head = f"const unsigned char {LIBRARY_SYMBOL}["
    start = c_source.index(head)
    body_start = c_source.index("{", start) + 1
    body_end = c_source.index("};", body_start)
    data = bytes(int(tok, 16) for tok in c_source[body_start:body_end].replace("\n", "").split(",") if tok.strip())
    patched = _patched_library_bin(data, source, fatbin)
    rows = ",\n  ".join(",".join(f"0x{b:02x}" for b in patched[i:i + 20]) for i in range(0, len(patched), 20))
    return (c_source[:start] + f"{head}{len(patched)}] = {{\n  {rows}\n" + c_source[body_end:])


def _patched_library_bin(data: bytes, source: bytes, fatbin: bytes) -> bytes:
    read = BlobReader(data)
    if read.u64() != len(data) - 8:
        raise GptjError("unexpected layout of TVM's packed library (size header); cannot embed the fatbin")
    row_ptr = [read.u64() for _ in range(read.u64())]
    [read.u64() for _ in range(read.u64())]  # child indices
    for _ in range(len(row_ptr) - 1):
        kind = read.bytes()
        if kind == b"_lib":
            continue
        blob_at = read.offset
        blob = read.bytes()
        if kind != b"cuda":
            continue
        code = struct.pack("<Q", len(source)) + source
        fmt = struct.pack("<Q", 4) + b"cuda"
        if not (blob.startswith(fmt) and blob.endswith(code)):
            raise GptjError("unexpected layout of TVM's CUDA module; cannot embed the fatbin")
        table = blob[len(fmt):len(blob) - len(code)]
        new_blob = (struct.pack("<Q", 6) + b"fatbin" + table + struct.pack("<Q", len(fatbin)) + fatbin)
        payload = data[8:blob_at] + struct.pack("<Q", len(new_blob)) + new_blob + data[read.offset:]
        return struct.pack("<Q", len(payload)) + payload
    raise GptjError("no CUDA module in TVM's packed library")


FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
FATBIN_KINDS = {1: "ptx", 2: "elf"}


def embedded_cuda_module(library: Path) -> tuple[dict[str, list[str]], bytes]:
    """What an exported library carries for the GPU: {kernel: its launch parameters (blockIdx.x,
    threadIdx.x, ...)} from the CUDA module's function table, and the fatbin."""
    data = Path(library).read_bytes()
    marker = struct.pack("<Q", 6) + b"fatbin"
    at = data.find(marker)
    if at < 0:
        raise GptjError(f"{library}: no CUDA fatbin in it")
    read = BlobReader(data, at + len(marker))
    kernels = {name: tags for name, (_, tags) in read.function_table().items()}
    fatbin = read.bytes()
    if not fatbin.startswith(FATBIN_MAGIC):
        raise GptjError(f"{library}: the CUDA module's code is not a fatbin")
    return kernels, fatbin


def fatbin_contents(fatbin: bytes) -> list[tuple[str, int]]:
    """The entries of a fatbin: ("elf" machine code or "ptx", compute capability), e.g. ("elf", 90)."""
    _, _, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    entries, offset = [], header
    while offset < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, offset)
        (arch,) = struct.unpack_from("<I", fatbin, offset + 28)
        entries.append((FATBIN_KINDS.get(kind, str(kind)), arch))
        offset += entry_header + payload
    return entries
