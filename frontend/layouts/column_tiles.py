"""Column tiles: W [in, out] stored [out / tile, in, tile], each tile of columns one contiguous run, which a
GEMV streams front to back (float32 and float16 CPU artifacts; schedules/cpu_matmul.py schedules the GEMM).
Plain [in, out] rows of 28672 bfloat16 columns ran at 10 GB/s: the widest tile that divides out wins."""

from __future__ import annotations

import numpy as np

from .base import LinearLayout, as_bits

WEIGHT_TILES = (512, 256, 128, 64, 32, 16, 8)


def weight_tile(out_features: int) -> int:
    """The column tile of a [in, out_features] weight: the widest of WEIGHT_TILES that divides it."""
    return next((t for t in WEIGHT_TILES if out_features % t == 0), out_features)


def tiled(weight: np.ndarray) -> np.ndarray:
    """[in, out] -> [out / tile, in, tile], contiguous."""
    k, n = weight.shape
    t = weight_tile(n)
    return np.ascontiguousarray(as_bits(weight).reshape(k, n // t, t).transpose(1, 0, 2)).view(weight.dtype)


class ColumnTiles(LinearLayout):
    name = "column-tiles"
    label = "column tiles (scheduled GEMM)"

    def parameters(self, in_features, out_features, dtype):
        tile = weight_tile(out_features)
        return {"weight": ((out_features // tile, in_features, tile), dtype)}

    def convert(self, weight):
        return {"weight": tiled(weight)}

    def matmul(self, x, params, in_features, out_features):
        from tvm import te
        from tvm.relax.frontend.nn import op

        tiles, k_extent, tile = (int(s) for s in params["weight"].shape)

        def compute(x: te.Tensor, w: te.Tensor):
            k = te.reduce_axis((0, k_extent), name="k")
            return te.compute(
                (x.shape[0], x.shape[1], tiles * tile),
                lambda b, t, j: te.sum(x[b, t, k].astype("float32") * w[j // tile, k, j % tile].astype("float32"),
                                       axis=k),
                name="matmul")

        return op.tensor_expr_op(compute, "matmul", [x, params["weight"]])


COLUMN_TILES = ColumnTiles()
