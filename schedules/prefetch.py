"""Software prefetch for the CPU GEMVs: each step of the reduction asks for the weights PREFETCH_BYTES ahead.

A decode GEMV streams one column tile of the weights per strip, one row (tile x dtype bytes, e.g. 1 KiB) per
step of k. The hardware prefetchers keep float32 rows coming at the memory's speed, but with bfloat16 the
widening takes three instructions per 16 weights, so fewer rows are in flight and the GEMV falls short of the
read bandwidth; asking for the rows WEIGHT_PREFETCH_BYTES ahead closes the gap (README, "Weight prefetch",
has the measurements). The prefetch goes to L2 (locality 2: `prefetcht1`), and past a strip's last row it
runs on into the next tile, which is the next strip a thread streams (its strips are consecutive, and so are
the tiles in memory), so a strip starts with its first rows on the way; a prefetch past the end of the
weights is harmless (prefetches never fault).

TVM's schedules have no prefetch primitive and its Python API no statement mutator, so the strip loop of a
scheduled GEMV (CPUMatmul, one row) is found in the function's TVMScript and the prefetch is written into it:
a function whose script does not have that exact shape is returned unchanged.
"""

from __future__ import annotations

import re

import tvm

from gptj_tvm.tir_kernels.common import WEIGHT_PREFETCH_BYTES as PREFETCH_BYTES
from gptj_tvm.tir_kernels.common import WEIGHT_PREFETCH_LOCALITY as LOCALITY

CACHE_LINE = 64
_INT = r"(?:T\.int64\((\d+)\)|(\d+))"
_K_LOOP = re.compile(rf"^( *)for k in range\({_INT}\):\n( *)for j_1 in T\.vectorized\({_INT}\):\n", re.M)


def _int(match, first: int) -> int:
    return int(match.group(first) or match.group(first + 1))


def with_weight_prefetch(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    text = func.script()
    loop = _K_LOOP.search(text)
    if loop is None:
        return func
    cols = _int(loop, 5)
    read = re.search(rf"(\w+)\[v_j // {_INT}, v_k, v_j % ", text)
    strip = re.search(rf"v_j = T\.axis\.spatial\({_INT}, j_0 \* {_INT} \+ j_1\)", text)
    if read is None or strip is None or _int(read, 2) != cols or _int(strip, 3) != cols:
        return func  # strips not aligned with the weight's column tiles
    weight = read.group(1)
    dtype = re.search(rf"{weight}: T\.Buffer\(\(.*?\), \"(\w+)\"\)", text)
    if dtype is None:
        return func
    item_bytes = tvm.runtime.DataType(dtype.group(1)).bits // 8
    per_line = CACHE_LINE // item_bytes
    ahead = max(1, PREFETCH_BYTES // (cols * item_bytes))  # rows
    indent = loop.group(4)
    # k + ahead may pass the strip's last row: the address is then in the next tile
    prefetch = (f"{indent}for line in T.unroll({max(1, cols // per_line)}):\n"
                f"{indent}    T.evaluate(T.call_llvm_intrin(\"void\", \"llvm.prefetch.p0\", T.address_of({weight}[j_0, "
                f"k + {ahead}, line * {per_line}]), 0, {LOCALITY}, 1))\n")
    at = loop.start() + len(loop.group(0).splitlines(keepends=True)[0])  # inside k, before the strip's row
    return tvm.script.from_source(text[:at] + prefetch + text[at:])
