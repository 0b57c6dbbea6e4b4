"""A default CPU schedule for the weight-only quantized GEMM/GEMV (frontend/layouts/quantized.py's quantized_matmul).

Expects a PrimFunc with two reduction blocks, a group sum (x times the integer levels over GROUP input
features) feeding the matmul (the group sums times their scales), optional injective prologues (casts of x)
and an injective epilogue chain (bias, casts, residual add). Leaves:
    for jo in parallel(N / TILE):           # one column tile of the weights per task: a contiguous run
      for row in rows:                      # 1 in decode; in prefill the tile stays in L2 across rows
        acc[TILE] = 0                       # float32, in registers
        for g in K / GROUP:
          part[TILE] = 0
          for ki in GROUP (unrolled):       # q4: both nibbles of a byte come from one load
            for c in TILE (vectorized):  part[c] += x[row, g*GROUP + ki] * level(g*GROUP + ki, c)
          for c in TILE (vectorized):    acc[c] += part[c] * scale[g, c]
        y[row, tile] = epilogue(acc)
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from gptj_tvm.frontend.layouts.quantized import TILE

from .cpu_matmul import _static_extent, fold_into_reductions, with_reductions


class CPUQuantMatmul(ScheduleRule):
    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = with_reductions(func, target, 2)
        if found is None:
            return None
        sch, root, blocks, reductions = found
        partial, matmul = (sch.get(b) for b in reductions)
        if not any(r.source.same_as(partial.writes[0].source) for r in matmul.reads):
            return None
        try:
            (partial_rv, matmul_rv), write_back = fold_into_reductions(sch, root, blocks, reductions)
        except Exception:  # noqa: BLE001  (a kernel this rule cannot shape: another rule or none handles it)
            return None

        *spatial, g = sch.get_loops(matmul_rv)
        *row_loops, col = spatial
        if _static_extent(sch, col) is None or _static_extent(sch, col) % TILE:
            return None
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else (row_loops[0] if row_loops else None)
        jo, ji = sch.split(col, [None, TILE])
        if rows is not None:
            sch.reorder(jo, rows, g, ji)
        else:
            sch.reorder(jo, g, ji)
        sch.compute_at(partial_rv, g, preserve_unit_loops=True)
        sch.set_scope(partial_rv, 0, "local")
        *_, pj, ki = sch.get_loops(partial_rv)
        sch.reorder(ki, pj)
        sch.reverse_compute_at(write_back, rows if rows is not None else jo, preserve_unit_loops=True)
        sch.parallel(jo)
        sch.vectorize(ji)
        sch.vectorize(pj)
        sch.unroll(ki)
        for block, loop in ((partial_rv, ki), (matmul_rv, g)):
            init = sch.decompose_reduction(block, loop)
            sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(write_back)[-1])
        return sch
