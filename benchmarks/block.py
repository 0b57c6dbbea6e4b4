"""One full-width GPT-J block (d 4096, d_ff 16384, bfloat16), decode step at context 128: plain vs fused.

    python benchmarks/block.py [--context 128] [--steps 5] [--out benchmarks/results/block.json]

Builds a random 2-layer GPT-J-6B-shaped checkpoint (two, so that `inspect` can tell the blocks' kernels from
the embedding's and lm_head's), compiles it twice (fused block, and --no-fuse-block), and times decode steps
after a prompt of context - 1 tokens. A block's time is the sum of its kernels' times per step over the
layers (the VM instrument hook times every kernel; embedding and lm_head are left out), next to the bandwidth
bound: the block's weight bytes over the memory bandwidth measured in the same run by a numpy copy.
Set TVM_NUM_THREADS (the CLI defaults it to every core); nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np



from gptj_tvm.frontend.random_checkpoint import make_config, write_random_checkpoint
from gptj_tvm.runtime.generator import Generator
from gptj_tvm.runtime.inspect import inspect_artifact
from gptj_tvm.compiler.compile import compile_model

from report import write_result  # benchmarks/report.py (a script's folder is on its path)


LAYERS = 2


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by numpy copying a buffer far larger than the caches."""
    src = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(folder: Path, context: int, steps: int) -> dict:
    gen = Generator.load(folder)
    report = inspect_artifact(folder)
    block_kernels = set(report["decode_block_kernels"])
    prompt = [(7 * i) % 50000 + 1 for i in range(context - 1)]
    step_ms, block_ms, per_kernel = [], [], {}
    for step in range(steps):
        cache = gen.new_cache()
        _, cache = gen.forward("prefill", prompt, cache, len(prompt))
        start = time.perf_counter()
        gen.forward("decode", [11 + step], cache, context)
        step_ms.append(1e3 * (time.perf_counter() - start))
        _, cache = gen.forward("prefill", prompt, gen.new_cache(), len(prompt))
        calls = gen.profile("decode", [11 + step], cache, context)
        layers = report["n_layer"]
        in_block = [(name, sec) for name, sec, _ in calls if name in block_kernels]
        block_ms.append(1e3 * sum(sec for _, sec in in_block) / layers)
        step_kernels: dict[str, float] = {}
        for name, sec in in_block:
            step_kernels[name] = step_kernels.get(name, 0.0) + 1e3 * sec / layers
        for name, ms in step_kernels.items():
            per_kernel.setdefault(name, []).append(ms)
    return {
        "fuse_block": report["fuse_block"],
        "decode_kernels_per_block": report["decode_kernels_per_block"],
        "block_kernels": report["decode_block_kernels"],
        "block_weight_bytes": report["weight_bytes_per_block"],
        "block_ms": float(np.median(block_ms)),
        "decode_step_ms": float(np.median(step_ms)),
        "kernel_ms": {name: float(np.median(times)) for name, times in per_kernel.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/block.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptj-block-") as tmp:
        model = Path(tmp) / "model"
        write_random_checkpoint(model, make_config("gptj-6b", LAYERS, "bfloat16"))
        rows = []
        for fuse in (False, True):
            artifact = Path(tmp) / f"artifact-{'fused' if fuse else 'plain'}"
            compile_model(model, artifact, fuse_block=fuse, progress=False)
            rows.append(measure(artifact, args.context, args.steps))
    bandwidth = copy_bandwidth()
    bound_ms = 1e3 * rows[0]["block_weight_bytes"] / bandwidth
    result = {"threads": os.environ["TVM_NUM_THREADS"], "context": args.context, "dtype": "bfloat16",
              "copy_bandwidth_gb_s": bandwidth / 1e9, "bound_ms": bound_ms, "graphs": rows}
    print(f"one GPT-J-6B block, bfloat16, decode at context {args.context}, {result['threads']} threads; "
          f"numpy copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'graph':8s} {'kernels/block':>13s} {'block ms':>9s} {'bound ms':>9s} {'x bound':>8s} "
          f"{'step ms (2 blocks + lm_head)':>29s}")
    for row in rows:
        print(f"{'fused' if row['fuse_block'] else 'plain':8s} {row['decode_kernels_per_block']:13d} "
              f"{row['block_ms']:9.2f} {bound_ms:9.2f} {row['block_ms'] / bound_ms:8.2f} "
              f"{row['decode_step_ms']:29.2f}")
        for name, ms in sorted(row["kernel_ms"].items(), key=lambda kv: -kv[1]):
            print(f"    {name:50s} {ms:8.3f} ms")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
