"""What every linear layout provides (frontend/layouts/__init__.py says how they are used)."""

from __future__ import annotations

import numpy as np


class LinearLayout:
    """y = x @ W (+ bias) (+ residual) for one stored form of W [in, out]. Subclasses set `name` (the key in
    artifacts), `label` (what inspect shows) and `hf_rows` (True: stored from Hugging Face's [out, in] as is,
    else from [in, out]), and implement `parameters`, `convert` and `matmul`."""

    name = ""
    label = ""
    hf_rows = False
    quantized = False  # converted from the checkpoint's own values, not from ones rounded to the model dtype

    def for_shape(self, in_features: int, out_features: int, plan) -> "LinearLayout":
        """The layout a [in, out] weight takes when this one is asked for by `plan` (a LayoutPlan): a fallback
        where it does not fit, the plan's choice of instructions where the layout has one."""
        return self

    def parameters(self, in_features: int, out_features: int, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """{parameter name: (shape, dtype)}, in the order the model declares them ("weight" first)."""
        raise NotImplementedError

    def convert(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        """A weight ([in, out], or [out, in] with hf_rows) -> {parameter name: contiguous array}."""
        raise NotImplementedError

    def matmul(self, x, params: dict, in_features: int, out_features: int):
        """x [b, n, in] (nn.Tensor) @ W -> float32 [b, n, out], from the parameters (nn.Tensor) by name."""
        raise NotImplementedError

    def forward(self, x, params: dict, in_features: int, out_features: int, bias=None, residual=None):
        """(x @ W + bias) + residual in float32, each where given: the graph's own order."""
        y = self.matmul(x, params, in_features, out_features)
        y = y + bias if bias is not None else y
        return y + residual if residual is not None else y

    def __repr__(self) -> str:
        return f"<layout {self.name}>"


def as_bits(array: np.ndarray) -> np.ndarray:
    """2-byte floats as uint16: numpy moves native types much faster than ml_dtypes' bfloat16."""
    return array.view(np.uint16) if array.dtype.itemsize == 2 else array
