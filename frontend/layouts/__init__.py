"""Linear layouts: how a linear weight is stored and multiplied, one object per kind, one file each.

A layout knows its parameters' shapes, the numpy conversion of a checkpoint's weight into them, the graph (or
hand-written kernel, from tir_kernels/) that multiplies by them, and its label. The model builds every linear in
column tiles; `ir/linear_layouts.py` swaps each for the layout a `LayoutPlan` gives it, and weight conversion
(frontend/weights.py) asks the same plan. A new layout is a file here plus a line in LAYOUTS.

Conversion needs numpy only: the layouts import TVM's compiler (graph ops, kernels) inside `matmul`, so
`convert-weights` runs where TVM's runtime alone is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptj_tvm.core.errors import GptjError

from .base import LinearLayout
from .column_pairs import COLUMN_PAIRS
from .column_tiles import COLUMN_TILES
from .quantized import INT8_DOTS, LM_HEAD, Q4, Q8, check_scheme
from .rows import ROWS

LAYOUTS: dict[str, LinearLayout] = {layout.name: layout for layout in (COLUMN_TILES, COLUMN_PAIRS, ROWS, Q8, Q4)}


def get_layout(name: str) -> LinearLayout:
    if name not in LAYOUTS:
        raise GptjError(f"unknown weight layout {name!r}: one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


@dataclass(frozen=True)
class LayoutPlan:
    """Which layout each linear of a model takes: the blocks' and lm_head's (with a layout's own fallback for a
    weight it cannot hold), and which dot-product instructions the GEMMs use: q8/q4's integer dot products
    (`int8_dot`, one of quantized.INT8_DOTS; "" widens the levels to float32), AVX512_BF16's vdpbf16ps for
    column pairs; and the width of the target's vector registers, which sets the pair GEMM's blocks."""
    blocks: str = COLUMN_TILES.name
    lm_head: str = COLUMN_TILES.name
    int8_dot: str = ""
    bf16_dot: bool = False
    vector_bits: int = 512

    def layout_for(self, name: str, in_features: int, out_features: int) -> LinearLayout:
        """The layout of the linear `name` (a parameter path such as h.0.w_in or lm_head)."""
        chosen = get_layout(self.lm_head if name.split(".")[0] == "lm_head" else self.blocks)
        return chosen.for_shape(in_features, out_features, self)

    @property
    def quantization(self) -> str | None:
        """The blocks' quantization scheme (q8, q4), or None for float weights."""
        return self.blocks if get_layout(self.blocks).quantized else None

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "lm_head": self.lm_head, "int8_dot": self.int8_dot, "bf16_dot": self.bf16_dot,
                "vector_bits": self.vector_bits}

    @classmethod
    def from_dict(cls, raw: dict) -> "LayoutPlan":
        # artifacts from before the 256-bit kernels say "vnni": true for AVX-512 VNNI
        int8_dot = str(raw.get("int8_dot", "avx512-vnni" if raw.get("vnni") else ""))
        plan = cls(str(raw["blocks"]), str(raw["lm_head"]), int8_dot, bool(raw.get("bf16_dot", False)),
                   int(raw.get("vector_bits", 512)))
        get_layout(plan.blocks), get_layout(plan.lm_head)
        if int8_dot and int8_dot not in INT8_DOTS:
            raise GptjError(f"unknown int8 dot product {int8_dot!r} in the layout plan: one of {', '.join(INT8_DOTS)}")
        return plan


__all__ = ["INT8_DOTS", "LAYOUTS", "LM_HEAD", "LayoutPlan", "LinearLayout", "check_scheme", "get_layout",
           "COLUMN_TILES", "COLUMN_PAIRS", "ROWS", "Q8", "Q4"]
