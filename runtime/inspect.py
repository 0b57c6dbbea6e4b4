"""What an artifact holds and what its functions run: `gptj-tvm inspect`. TVM runtime only.

Kernel launches are counted from what actually runs: one prefill and one decode step go through the VM with
its instrument hook, and every call of a compiled PrimFunc counts (the KV-cache append and attention are
PrimFuncs too). The blocks share their kernels, so a kernel called c times per step runs c // n_layer times
per block; the rest (embedding, final LayerNorm, lm_head) is outside the blocks. With one layer nothing tells
the two apart, and every kernel counts as the block's: inspect a model of two or more layers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path


from . import artifact
from .engine import Generator, weight_sizes

PREFILL_TOKENS = 4


def _kernel_calls(gen: Generator, function: str, ids: list[int], cache, total: int) -> list[str]:
    return [name for name, _, _ in gen.profile(function, ids, cache, total) if not name.startswith("vm.builtin.")]


def per_block(calls: list[str], n_layer: int) -> list[str]:
    """The kernels of one block in call order: each kernel appears count // n_layer times."""
    counts = Counter(calls)
    block, seen = [], Counter()
    for name in calls:
        if seen[name] < counts[name] // n_layer:
            block.append(name)
        seen[name] += 1
    return block


def weight_bytes(folder: Path, meta: dict) -> tuple[int, int]:
    """(all weight bytes, bytes of block 0's weights)."""
    sizes = weight_sizes(folder, meta)
    return sum(size for size, _, _ in sizes), sum(size for size, _, key in sizes if key.startswith("h.0."))




def inspect_artifact(folder, run: bool = True) -> dict:
    """What the artifact holds; with run, the kernels are counted from one prefill and one decode step on the
    artifact's device, else (no such device here, e.g. a CUDA artifact on a CPU machine) from the kernel calls
    compile recorded from the compiled graph."""
    folder = Path(folder)
    meta = artifact.read_metadata(folder)
    n_layer = int(meta["config"]["n_layer"])
    if run:
        gen = Generator.load(folder)
        cache = gen.new_cache()
        prompt = list(range(1, PREFILL_TOKENS + 1))
        prefill = _kernel_calls(gen, "prefill", prompt, cache, len(prompt))
        decode = _kernel_calls(gen, "decode", [PREFILL_TOKENS + 1], cache, len(prompt) + 1)
    else:
        prefill, decode = meta["kernel_calls"]["prefill"], meta["kernel_calls"]["decode"]
    decode_block, prefill_block = per_block(decode, n_layer), per_block(prefill, n_layer)
    total_bytes, block_bytes = weight_bytes(folder, meta)
    schedules = meta.get("kernels", {})
    # the prefill buckets' functions (compile recorded their calls): their kernels are static-shaped copies
    buckets = [call for function in meta.get("prefill_buckets", {}).values()
               for call in meta["kernel_calls"].get(function, [])]
    kernels = {name: {"schedule": schedules.get(name, "VM shape function" if name.startswith("shape_func")
                                                else "unknown"), "decode_calls": decode.count(name),
                      "prefill_calls": prefill.count(name), "prefill_bucket_calls": buckets.count(name)}
               for name in dict.fromkeys(prefill + decode + buckets)}
    return {
        "artifact": str(folder),
        "kernels_counted_from": "a run" if run else "the compiled graph",
        "dtype": meta["dtype"],
        "target": meta["target"],
        "device": meta["device"],
        "fuse_block": meta.get("fuse_block", False),
        "n_layer": n_layer,
        "functions": meta["functions"],
        "prefill_buckets": sorted(int(b) for b in meta.get("prefill_buckets", {})),
        "weight_bytes": total_bytes,
        "weight_bytes_per_block": block_bytes,
        "decode_kernel_launches": len(decode),
        "decode_kernels_per_block": len(decode_block),
        "decode_block_kernels": decode_block,
        "prefill_kernel_launches": len(prefill),
        "prefill_kernels_per_block": len(prefill_block),
        "prefill_block_kernels": prefill_block,
        "kernels": kernels,
    }
