"""Rows: Hugging Face's own W [out, in], for GPUs (dlight's GEMV rule: one warp group per output row, a
cross-thread sum)."""

from __future__ import annotations

import numpy as np

from .base import LinearLayout


class Rows(LinearLayout):
    name = "rows"
    label = "rows [out, in] (GPU GEMV)"
    hf_rows = True

    def parameters(self, in_features, out_features, dtype):
        return {"weight": ((out_features, in_features), dtype)}

    def convert(self, weight):
        return {"weight": np.ascontiguousarray(weight)}

    def matmul(self, x, params, in_features, out_features):
        from tvm import te
        from tvm.relax.frontend.nn import op

        def compute(x: te.Tensor, w: te.Tensor):
            k = te.reduce_axis((0, in_features), name="k")
            return te.compute((x.shape[0], x.shape[1], out_features),
                              lambda b, t, j: te.sum(x[b, t, k].astype("float32") * w[j, k].astype("float32"), axis=k),
                              name="matmul")

        return op.tensor_expr_op(compute, "matmul", [x, params["weight"]])


ROWS = Rows()
