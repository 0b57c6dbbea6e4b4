"""This host's memory read bandwidth with every thread: a TVM-compiled sum over a buffer far larger than the caches.

The denominator of every bandwidth bound (weight bytes / read bandwidth) in `gptj-tvm bench` and benchmarks/.
A single-threaded numpy copy under-reports what the GEMVs can reach: this kernel reads with all threads, as
the model's kernels do. `python -m gptj_tvm.targets.bandwidth` prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tvm
from tvm.script import tirx as T

from gptj_tvm.tir_kernels.common import HAND_SCHEDULED, WEIGHT_PREFETCH_BYTES, WEIGHT_PREFETCH_LOCALITY, prefetch

from .llvm import host_target

LANES = 128


def _sum_kernel(n: int, parts: int) -> tvm.tirx.PrimFunc:
    """sums[p, j] = sum over i of data[p * chunk + i * LANES + j]: each part a contiguous chunk, streamed with
    the weights' software prefetch (16 KiB ahead into L2, as the GEMVs do; without it this read 4-11% less
    here than with it, and the q8 GEMVs read faster than the "bound")."""
    chunk = n // parts
    ahead = WEIGHT_PREFETCH_BYTES // (LANES * 4)  # steps

    @T.prim_func(s_tir=True)
    def kernel(data: T.Buffer((n,), "float32"), sums: T.Buffer((parts, LANES), "float32")):
        T.func_attr(HAND_SCHEDULED)
        for p in T.parallel(parts):
            with T.sblock("sums"):
                acc = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
                for j in T.vectorized(LANES):
                    acc[j] = T.float32(0)
                for i in range(chunk // LANES):
                    for line in T.unroll(LANES * 4 // 64):  # past the chunk: the next one, or harmless
                        prefetch(data[p * chunk + (i + ahead) * LANES + line * 16], WEIGHT_PREFETCH_LOCALITY)
                    for j in T.vectorized(LANES):
                        acc[j] = acc[j] + data[p * chunk + i * LANES + j]
                for j in T.vectorized(LANES):
                    sums[p, j] = acc[j]

    return kernel


def read_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes read per second by all threads summing a gib-GiB float32 buffer (best of repeats)."""
    threads = int(os.environ["TVM_NUM_THREADS"])
    parts = threads * 8
    n = int(gib * 2**30) // 4 // (parts * LANES) * (parts * LANES)
    target = host_target()
    lib = tvm.tirx.build(_sum_kernel(n, parts).with_attr("global_symbol", "read_sum"), target=target)
    data = tvm.runtime.tensor(np.ones(n, dtype=np.float32))
    out = tvm.runtime.empty((parts, LANES), "float32")
    timer = lib.time_evaluator("read_sum", tvm.cpu(), number=1, repeat=repeats)
    best = min(timer(data, out).results)
    assert abs(float(out.numpy().sum()) - n) < 1e-3 * n  # it really read every element
    return n * 4 / best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Read bandwidth with every thread (TVM_NUM_THREADS).")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--gib", type=float, default=4.0, help="buffer size in GiB (default 4)")
    parser.add_argument("--repeats", type=int, default=10, help="reads of the buffer, the best counts (default 10)")
    args = parser.parse_args()
    bandwidth = read_bandwidth(args.gib, args.repeats)
    if args.json:
        print(json.dumps({"read_bandwidth": bandwidth, "threads": int(os.environ["TVM_NUM_THREADS"])}))
    else:
        print(f"{bandwidth / 1e9:.1f} GB/s read with {os.environ['TVM_NUM_THREADS']} threads")
    sys.exit(0)
