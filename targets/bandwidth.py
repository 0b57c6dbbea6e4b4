"""This host's memory read bandwidth with every thread: a TVM-compiled sum over a buffer far larger than the caches.

The denominator of every bandwidth bound (weight bytes / read bandwidth) in `gptj-tvm bench` and benchmarks/.
A single-threaded numpy copy under-reports what the GEMVs can reach: this kernel reads with all threads, as
the model's kernels do. `python -m gptj_tvm.targets.bandwidth` prints it.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import tvm  # noqa: E402
from tvm import s_tir, te  # noqa: E402

from .llvm import host_target  # noqa: E402

LANES = 128


def _sum_kernel(n: int, parts: int) -> tvm.tirx.PrimFunc:
    chunk = n // parts
    data = te.placeholder((n,), "float32", name="data")
    i = te.reduce_axis((0, chunk // LANES), name="i")
    out = te.compute((parts, LANES), lambda p, j: te.sum(data[p * chunk + i * LANES + j], axis=i), name="sums")
    sch = s_tir.Schedule(te.create_prim_func([data, out]))
    block = sch.get_sblock("sums")
    p, j, i = sch.get_loops(block)
    sch.reorder(p, i, j)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, p)
    sch.parallel(p)
    sch.vectorize(j)
    sch.decompose_reduction(block, i)
    return sch.mod["main"]


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
    bandwidth = read_bandwidth()
    if "--json" in sys.argv:
        print(json.dumps({"read_bandwidth": bandwidth, "threads": int(os.environ["TVM_NUM_THREADS"])}))
    else:
        print(f"{bandwidth / 1e9:.1f} GB/s read with {os.environ['TVM_NUM_THREADS']} threads")
    sys.exit(0)
