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


from .artifact import ArtifactMetadata
from gptj_tvm.frontend.layouts import LinearLayout

from .model import Model, runnable_here, weight_headers

PREFILL_TOKENS = 4


def _kernel_calls(gen: Model, function: str, ids: list[int], cache, total: int) -> list[str]:
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


def weight_bytes(folder: Path, meta: ArtifactMetadata) -> tuple[int, int]:
    """(all weight bytes, bytes of block 0's weights)."""
    weights = weight_headers(folder, meta)
    return sum(w.bytes for w in weights), sum(w.bytes for w in weights if w.key.startswith("h.0."))


def inspect_artifact(folder, run: bool | None = None) -> dict:
    """What the artifact holds; with run, the kernels are counted from one prefill and one decode step on the
    artifact's device, else (no such device here, e.g. a CUDA artifact on a CPU machine) from the kernel calls
    compile recorded from the compiled graph; None: run where this machine has the device."""
    folder = Path(folder)
    meta = ArtifactMetadata.read(folder)
    run = runnable_here(meta) if run is None else run
    n_layer = meta.n_layer
    if run:
        gen = Model.load(folder)
        cache = gen.new_cache()
        prompt = list(range(1, PREFILL_TOKENS + 1))
        prefill = _kernel_calls(gen, "prefill", prompt, cache, len(prompt))
        decode = _kernel_calls(gen, "decode", [PREFILL_TOKENS + 1], cache, len(prompt) + 1)
    else:
        prefill, decode = meta.kernel_calls["prefill"], meta.kernel_calls["decode"]
    decode_block, prefill_block = per_block(decode, n_layer), per_block(prefill, n_layer)
    total_bytes, block_bytes = weight_bytes(folder, meta)
    schedules = meta.kernels
    # the prefill buckets' functions (compile recorded their calls): their kernels are static-shaped copies
    buckets = [call for function in meta.prefill_buckets.values()
               for call in meta.kernel_calls.get(function, [])]
    kernels = {name: {"schedule": schedules.get(name, "VM shape function" if name.startswith("shape_func")
                                                else "unknown"), "decode_calls": decode.count(name),
                      "prefill_calls": prefill.count(name), "prefill_bucket_calls": buckets.count(name)}
               for name in dict.fromkeys(prefill + decode + buckets)}
    return {
        "artifact": str(folder),
        "kernels_counted_from": "a run" if run else "the compiled graph",
        "dtype": meta.dtype,
        "target": meta.target,
        "device": meta.device,
        "fuse_block": meta.fuse_block,
        "n_layer": n_layer,
        # each linear kind's layout, as compile's plan gave it (a weight that does not fit takes the fallback)
        "linear_layouts": {part: {"layout": layout.name, "label": layout.label}
                           for part, layout in layouts_in_use(meta).items()},
        "functions": meta.functions,
        "prefill_buckets": sorted(int(b) for b in meta.prefill_buckets),
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


def layouts_in_use(meta: ArtifactMetadata) -> dict[str, LinearLayout]:
    """The layout of block 0's first linear (W_in, or q_proj unfused) and of lm_head, as the plan gives them."""
    config = meta.config
    d = config.n_embd
    first, in_out = ("h.0.w_in", (d, 3 * d + config.d_ff)) if meta.fuse_block else ("h.0.attn.q_proj", (d, d))
    return {"blocks": meta.plan.layout_for(first, *in_out),
            "lm_head": meta.plan.layout_for("lm_head", d, config.padded_vocab_size)}


def format_report(report: dict) -> str:
    """inspect's report as the lines `gptj-tvm inspect` prints."""
    target = f"{report['target']['kind']} {report['target'].get('mcpu') or report['target'].get('arch') or ''}"
    lines = [f"{report['artifact']}: {report['dtype']}, {target.strip()}, {report['n_layer']} layers, "
             f"{'fused' if report['fuse_block'] else 'plain'} blocks",
             "linear layouts: " + "; ".join(f"{part} {info['label']}"
                                           for part, info in report["linear_layouts"].items()),
             f"kernels counted from {report['kernels_counted_from']}",
             f"functions: {', '.join(report['functions'])}",
             f"weights: {report['weight_bytes'] / 2**20:.1f} MiB, {report['weight_bytes_per_block'] / 2**20:.1f} "
             "MiB per block"]
    for phase in ("decode", "prefill"):
        lines.append(f"{phase}: {report[f'{phase}_kernel_launches']} kernel launches per step, "
                     f"{report[f'{phase}_kernels_per_block']} per block: "
                     f"{' -> '.join(report[f'{phase}_block_kernels'])}")
    if report["prefill_buckets"]:
        lines.append(f"prefill in chunks of {', '.join(map(str, report['prefill_buckets']))} tokens "
                     "(static prefill functions), then the rest")
    lines.append("kernels (schedule, calls per decode step, per prefill, per prefill of every bucket):")
    for name, info in report["kernels"].items():
        lines.append(f"  {name:48s} {info['schedule']:24s} {info['decode_calls']:4d} {info['prefill_calls']:4d} "
                     f"{info['prefill_bucket_calls']:4d}")
    return "\n".join(lines)
