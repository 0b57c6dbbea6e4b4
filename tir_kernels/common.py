"""What the hand-written kernels share: their attributes, the software prefetch of streamed weights, and the
pairwise fold of a vector's lanes."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

# the schedule rules leave a kernel with these alone (schedules/default.py), and its buffers do not alias
HAND_SCHEDULED = {"tirx.is_scheduled": True, "tirx.noalias": True}

# How far ahead the weight-streaming kernels ask for their weights (the float GEMVs, schedules/prefetch.py; the
# pair and VNNI GEMMs) and the bandwidth read the bound divides by (targets/bandwidth.py), into L2
WEIGHT_PREFETCH_BYTES = 16 << 10
WEIGHT_PREFETCH_LOCALITY = 2  # llvm.prefetch's locality: 3 = L1 (prefetcht0), 2 = L2 (prefetcht1)


def prefetch(element, locality: int = 3):
    """Ask for the cache line holding `element` (a buffer load) before it is read; locality 3: into L1
    (`prefetcht0`), 2: into L2 (`prefetcht1`)."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(element), 0, locality, 1))


def fold_lanes(buf, base, lanes: int, dtype: str, combine=lambda a, b: a + b):
    """buf[base .. base + lanes] combined pairwise: the halves combined, then their halves, ..., as vector halves
    (LLVM made a mess of the same sums written as stores of narrower vectors into one buffer). For a float sum
    this fixes the order of the additions; a maximum or an integer sum is exact in any order."""
    if lanes == 1:
        return buf[base]
    v = buf.vload([base], f"{dtype}x{lanes}")
    while lanes > 2:
        lanes //= 2
        v = combine(T.vectorlow(f"{dtype}x{lanes}", v), T.vectorhigh(f"{dtype}x{lanes}", v))
    return combine(tirx.Shuffle([v], [0]), tirx.Shuffle([v], [1]))
