"""Column pairs: W [in, out] stored [out / tile, in / 2, tile, 2], input features 2r and 2r + 1 of a column in
one 32-bit word, which a shift and a mask widen to two float32 (bfloat16 CPU artifacts; the kernel is
tir_kernels/pair_gemm.py, which adds the bias and the residual as it writes y). Tiles are narrower than column
tiles': a tile's accumulators for 4 prompt positions must fit in registers. On CPUs with AVX512_BF16 the
kernel multiplies on vdpbf16ps, which takes a 64-byte row of the layout as it is. A weight that does not pair (odd
in_features, or no PAIR_TILES width divides out_features) stays in column tiles."""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import LinearLayout, as_bits
from .column_tiles import COLUMN_TILES

PAIR_TILES = (64, 32, 16, 8)


def pair_tile(in_features: int, out_features: int) -> int | None:
    """The tile of a [in, out_features] weight in column pairs, or None where the weight does not pair."""
    if in_features % 2:
        return None
    return next((t for t in PAIR_TILES if out_features % t == 0), None)


def paired(weight: np.ndarray) -> np.ndarray:
    """[in, out] -> [out / tile, in / 2, tile, 2], contiguous."""
    k, n = weight.shape
    t = pair_tile(k, n)
    return np.ascontiguousarray(as_bits(weight).reshape(k // 2, 2, n // t, t).transpose(2, 0, 3, 1)).view(weight.dtype)


@dataclasses.dataclass(frozen=True)
class ColumnPairs(LinearLayout):
    dot: bool = False  # the GEMM on vdpbf16ps (AVX512_BF16), else widened to float32 by a shift and a mask
    vector_bits: int = 512  # the target's vector registers (256: AVX2), which set the kernel's blocks
    name = "column-pairs"

    @property
    def label(self) -> str:
        return "column pairs (hand-written bfloat16 GEMM, " + (
            "vdpbf16ps dot products)" if self.dot else "widened to float32)")

    def for_shape(self, in_features, out_features, plan):
        if pair_tile(in_features, out_features) is None:
            return COLUMN_TILES
        return dataclasses.replace(self, dot=plan.bf16_dot, vector_bits=plan.vector_bits)

    def parameters(self, in_features, out_features, dtype):
        tile = pair_tile(in_features, out_features)
        return {"weight": ((out_features // tile, in_features // 2, tile, 2), dtype)}

    def convert(self, weight):
        return {"weight": paired(weight)}

    def forward(self, x, params, in_features, out_features, bias=None, residual=None):
        from tvm.relax.frontend import nn
        from tvm.relax.frontend.nn import op

        from gptj_tvm.tir_kernels.pair_gemm import pair_matmul

        extra = [t for t in (bias, residual) if t is not None]
        kernel = pair_matmul(in_features, out_features, pair_tile(in_features, out_features), str(x.dtype),
                             bias=bias is not None, residual=residual is not None,
                             dot=self.dot and str(x.dtype) == "bfloat16", lanes=self.vector_bits // 32)
        return op.tensor_ir_op(kernel, "pair_matmul", [x, params["weight"], *extra],
                               nn.Tensor.placeholder([1, x.shape[1], out_features], "float32"))


COLUMN_PAIRS = ColumnPairs()
