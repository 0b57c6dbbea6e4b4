"""A default CPU schedule for matmuls and GEMVs whose output's last dim is the weight's contiguous dim.

Our weights are stored [in, out], so y[..., j] = sum_k x[..., k] * W[k, j] reads W row by row: dlight's CPU GEMV
rule only handles the transposed ([out, in], inner-reduction) form and leaves these kernels unscheduled.

Expects a PrimFunc with exactly one reduction block (the matmul), optional injective prologue blocks (casts of
inputs) and an injective epilogue chain (bias, casts, gelu_new, residual adds). Leaves:
    for jo in parallel(N / cols):          # column strips: each thread streams its own strip of W
      acc[cols] = 0                        # decode (one row of x): float32 accumulators in registers
      for k in K:
        for ji in cols (vectorized):  acc[ji] += x[k] * W[k, jo*cols + ji]     (+ a prefetch: prefetch.py)
      y[cols] = epilogue(acc)              # bias, gelu_new, residual ... fused into the write-back
and for prefill (several rows; see _gemm) the strip's accumulators for every row, filled in register blocks:
      for ko in K / K_BLOCK:  for ro in rows / 4:  for jm in cols / 64:  for ki in K_BLOCK:  4 x 64 FMAs
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from gptj_tvm.frontend.layouts.column_tiles import WEIGHT_TILES

from .prefetch import with_weight_prefetch

# Wide column strips keep each row's read of W long and contiguous (512 bf16 columns = 1 KiB); measured on
# 4096 x 16384 bf16 GEMVs with 2 threads: 64 columns 12 ms, 512 columns 4-7 ms (bound about 4 ms).
COLS = WEIGHT_TILES
TILE_ROWS = 4
# Prefill GEMMs: 4 rows x 64 columns of accumulators, k in blocks of 256 weight rows (a 512-column bfloat16
# tile's 256 KiB block stays in L2). 128 x 4096 x 28672 bfloat16, 2 threads: 724 -> 191 ms against
# 4 rows x 512 columns over all of k (whose 128 accumulator registers spilled on every step).
SUB_COLS = 64
K_BLOCK = 256


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def with_reductions(func, target: Target, count: int):
    """(schedule, root, its child blocks, the reduction blocks) of an llvm PrimFunc with exactly count
    reduction blocks, else None."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001
        return None
    blocks = sch.get_child_blocks(root)
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    return (sch, root, blocks, reductions) if len(reductions) == count else None


def fold_into_reductions(sch: s_tir.Schedule, root, blocks, reductions):
    """Inline every prologue (casts of inputs) into the reductions and every epilogue (bias, casts, residual
    adds) into a local write-back of the last reduction (the matmul). Returns the reductions' fresh block
    handles and the write-back; raises where a block does not fold."""
    # by name: a block's statement changes as others are inlined into it
    keep = [sch.get(b).name_hint for b in reductions]
    last = sch.get(blocks[-1]).name_hint
    for name in [sch.get(b).name_hint for b in blocks]:
        if name not in keep and name != last:
            sch.compute_inline(sch.get_sblock(name))
    kept = [sch.get_sblock(name) for name in keep]
    write_back = sch.cache_write(kept[-1], 0, "local")
    done = set(keep) | {sch.get(write_back).name_hint}
    rest = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in done]
    if len(rest) > 1:
        raise ValueError("more than one epilogue block left")
    for block in rest:
        sch.reverse_compute_inline(block)
    return kept, write_back


def _reads_columns_contiguously(block) -> bool:
    """Whether some input's innermost index is the output column (the weight [in, out] or its column tiles)."""
    column = block.iter_vars[-2].var
    for region in block.reads:
        innermost = region.region[-1].min
        if any(v.same_as(column) for v in tirx.analysis.undefined_vars(innermost)):
            return True
    return False


def _static_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class CPUMatmul(ScheduleRule):
    def __init__(self, cols: tuple[int, ...] = COLS, tile_rows: int = TILE_ROWS, prefetch: bool = True):
        self.cols = cols
        self.tile_rows = tile_rows
        self.prefetch = prefetch  # GEMVs ask for the weight row a few steps ahead (prefetch.py)

    def pick_cols(self, extent: int) -> int:
        """The widest strip that divides the columns (a ragged strip would not vectorize): the same rule as
        the weights' column tiles (frontend/layouts/column_tiles.py), so a strip is one contiguous tile."""
        return next((c for c in self.cols if extent % c == 0), extent)

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = with_reductions(func, target, 1)
        if found is None:
            return None
        sch, root, blocks, (matmul,) = found
        iters = sch.get(matmul).iter_vars
        if len(iters) < 2 or iters[-1].iter_type != tirx.IterVar.CommReduce or \
                any(iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]):
            return None
        try:
            (matmul,), write_back = fold_into_reductions(sch, root, blocks, [matmul])
        except Exception:  # noqa: BLE001  (a kernel this rule cannot shape: another rule or none handles it)
            return None

        if not _reads_columns_contiguously(sch.get(matmul)):
            return None  # an [out, in] weight: strips of output columns would gather, not stream

        *spatial, k = sch.get_loops(matmul)
        *row_loops, col = spatial
        col_extent = _static_extent(sch, col)
        if col_extent is None or _static_extent(sch, k) is None:
            return None  # attention's matmuls over the cache length: a wrong result was seen when tiled here
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else (row_loops[0] if row_loops else None)
        cols = self.pick_cols(col_extent)
        jo, ji = sch.split(col, [None, cols])
        row_extent = _static_extent(sch, rows) if rows is not None else 1
        if rows is not None and row_extent != 1:
            return self._gemm(sch, matmul, write_back, jo, ji, rows, k, cols, _static_extent(sch, k))
        # a decode GEMV (one row): memory bound
        if rows is not None:
            sch.reorder(jo, rows, k, ji)
        else:
            sch.reorder(jo, k, ji)
        sch.reverse_compute_at(write_back, rows if rows is not None else jo, preserve_unit_loops=True)
        sch.parallel(jo)
        sch.vectorize(ji)
        init = sch.decompose_reduction(matmul, k)  # last: parallel() wants the reduction block whole
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(write_back)[-1])
        return s_tir.Schedule(with_weight_prefetch(sch.mod["main"])) if self.prefetch else sch

    def _gemm(self, sch, matmul, write_back, jo, ji, rows, k, cols: int, k_extent: int):
        """Prefill's GEMMs (several rows; compute bound): register blocks of tile_rows x SUB_COLS float32
        accumulators (4 x 4 AVX-512 registers) over K_BLOCK rows of the weights, which stay in L2 while every
        row block of x passes over them; each strip's accumulators for all rows live in a local buffer.
        Every output still sums over k in order, so the result is the same as the GEMV schedule's."""
        sub = next((c for c in (SUB_COLS, 32, 16, 8) if cols % c == 0), cols)
        k_block = next((b for b in (K_BLOCK, 128, 64, 32, 16, 8) if k_extent % b == 0), k_extent)
        jm, js = sch.split(ji, [None, sub])
        ko, ki = sch.split(k, [None, k_block])
        ro, ri = sch.split(rows, [None, self.tile_rows])
        sch.reorder(jo, ko, ro, jm, ki, ri, js)
        sch.reverse_compute_at(write_back, jo, preserve_unit_loops=True)
        sch.parallel(jo)
        sch.vectorize(js)
        sch.unroll(ri)
        init = sch.decompose_reduction(matmul, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(write_back)[-1])
        return sch
