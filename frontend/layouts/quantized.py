"""Weight-only quantization: what q8 and q4 mean, and the quantizer that runs at weight conversion (numpy).

Symmetric, per group of GROUP consecutive input features of one output feature, float16 scales:
    scale = float16(e / QMIN)        e: the group's value of largest magnitude (scale 1 for an all-zero group)
    q     = clip(round_half_even(w / scale), QMIN, QMAX)
    w'    = q * scale
q8: levels -127..127, 8.5 bits per weight. q4: levels -8..7, 4.5 bits per weight: the extreme lands on -8 (the
scale takes its sign), so all 16 levels are used (ggml's q4_0 does the same), and then one least-squares step
moves the scale to <w, q> / <q, q> (requantized) where that lowers the group's squared error: 13% less RMS
error than max / 7 on Gaussian weights, for no cost at run time. Every linear weight of the blocks is
quantized; lm_head is q8 in both (its 206M weights are a twelfth of the model's time; q4 moves its logits
most); the embedding table stays in the model dtype (decode reads one row of it per token).

Stored layout, per linear (made for AVX-512 VNNI, tir_kernels/vnni_gemm.py): the levels unsigned, q + OFFSET,
in column tiles of TILE outputs, four consecutive input features of one output in one 32-bit word:
    q8: uint8 [out / TILE, in / 4, TILE, 4]          byte [t, i, c, r] = q[4i + r, t TILE + c] + 128
    q4: uint8 [out / TILE, in / 8, TILE, 4]          low nibble: q[8i + r, .] + 8, high nibble: q[8i + 4 + r, .] + 8
and the scales float16 [out / TILE, in / GROUP, TILE].

The GEMM: on an x86 CPU the input is quantized per group to int8 and the GEMM runs on integer dot products
(`int8_dot`, the best of INT8_DOTS the target has): AVX-512 VNNI's `vpdpbusd` on zmm (tir_kernels/vnni_gemm.py),
AVX-VNNI's on ymm or AVX2's `vpmaddubsw` (tir_kernels/ymm_gemm.py), all on this layout and with the same result;
otherwise the levels are widened to float32 and multiplied by x exactly (`quantized_matmul`, scheduled by
schedules/cpu_quant.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gptj_tvm.core.errors import GptjError

from .base import LinearLayout

SCHEMES = ("q8", "q4")
GROUP = 32
TILE = 64  # 64 float32 accumulators per strip: 4 AVX-512 registers, plus 4 for the group's partial sums
QMAX = {"q8": 127, "q4": 7}
QMIN = {"q8": -127, "q4": -8}
OFFSET = {"q8": 128, "q4": 8}
FEATURES_PER_ROW = {"q8": 4, "q4": 8}  # input features in one [.., TILE, 4] row of the stored levels
LM_HEAD = "q8"
# The integer dot products a quantized GEMM runs on, best first, and the ISA flags (as /proc/cpuinfo names them)
# each needs
INT8_DOTS = {"avx512-vnni": ("avx512f", "avx512bw", "avx512_vnni"), "avx-vnni": ("avx2", "avx_vnni"),
             "avx2": ("avx2",)}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise GptjError(f"unknown quantization {scheme!r}: choose q8 or q4")


def check_shape(in_features: int, out_features: int) -> None:
    if in_features % GROUP or out_features % TILE:
        raise GptjError(f"cannot quantize a {in_features} x {out_features} weight: its input features must be a "
                        f"multiple of {GROUP} and its output features of {TILE}")


def quantize(weight: np.ndarray, scheme: str, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] float weight -> (levels [in, out] int8, scales [in / GROUP, out] float16), as the module says.
    Works through `block` output columns at a time, so its float32 temporaries stay small."""
    k, n = weight.shape
    check_shape(k, n)
    levels = np.empty((k, n), dtype=np.int8)
    scales = np.empty((k // GROUP, n), dtype=np.float16)
    for start in range(0, n, block):
        groups = weight[:, start:start + block].astype(np.float32).reshape(k // GROUP, GROUP, -1)
        extreme = np.take_along_axis(groups, np.abs(groups).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
        scale, q = _levels(groups, extreme / np.float32(QMIN[scheme]), scheme)
        if scheme == "q4":
            fitted = (groups * q).sum(axis=1) / np.maximum((q * q).sum(axis=1), 1)
            scale2, q2 = _levels(groups, fitted, scheme)
            better = _squared_error(groups, scale2, q2) < _squared_error(groups, scale, q)
            scale, q = np.where(better, scale2, scale), np.where(better[:, None, :], q2, q)
        levels[:, start:start + block] = q.astype(np.int8).reshape(k, -1)
        scales[:, start:start + block] = scale
    return levels, scales


def _levels(groups: np.ndarray, scale: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(float16 scales [groups, n], float32 levels [groups, GROUP, n]) for these scales."""
    scale = scale.astype(np.float16)
    scale[scale == 0] = 1
    q = np.clip(np.rint(groups / scale.astype(np.float32)[:, None, :]), QMIN[scheme], QMAX[scheme])
    return scale, q


def _squared_error(groups: np.ndarray, scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.square(q * scale.astype(np.float32)[:, None, :] - groups).sum(axis=1)


def pack(levels: np.ndarray, scheme: str) -> np.ndarray:
    """int8 levels [in, out] -> the stored levels (the module's layout)."""
    k, n = levels.shape
    unsigned = (levels.astype(np.int16) + OFFSET[scheme]).astype(np.uint8)
    quads = unsigned.reshape(k // 4, 4, n // TILE, TILE)  # [i, r, t, c]: feature 4i + r of column t TILE + c
    if scheme == "q4":
        quads = quads[0::2] | (quads[1::2] << 4)  # features 8i + r low, 8i + 4 + r high
    return np.ascontiguousarray(quads.transpose(2, 0, 3, 1))


def tiled(array: np.ndarray) -> np.ndarray:
    """[rows, out] -> [out / TILE, rows, TILE], contiguous."""
    rows, n = array.shape
    return np.ascontiguousarray(array.reshape(rows, n // TILE, TILE).transpose(1, 0, 2))


@dataclasses.dataclass(frozen=True)
class Quantized(LinearLayout):
    scheme: str = "q8"
    int8_dot: str = ""  # the GEMM on these integer dot products (INT8_DOTS; "": float32 from the widened levels)
    quantized = True

    @property
    def name(self) -> str:
        return self.scheme

    @property
    def label(self) -> str:
        gemm = f"{self.int8_dot} integer dot products" if self.int8_dot else "levels widened to float32"
        return f"{self.scheme}: {8 if self.scheme == 'q8' else 4}-bit levels, groups of {GROUP} ({gemm})"

    def for_shape(self, in_features, out_features, plan):
        check_shape(in_features, out_features)
        return dataclasses.replace(self, int8_dot=plan.int8_dot)

    def parameters(self, in_features, out_features, dtype):
        tiles = out_features // TILE
        return {"weight": ((tiles, in_features // FEATURES_PER_ROW[self.scheme], TILE, 4), "uint8"),
                "scale": ((tiles, in_features // GROUP, TILE), "float16")}

    def convert(self, weight):
        levels, scales = quantize(weight, self.scheme)
        return {"weight": pack(levels, self.scheme), "scale": tiled(scales)}

    def matmul(self, x, params, in_features, out_features):
        if not self.int8_dot:
            return quantized_matmul(x, params["weight"], params["scale"], self.scheme)
        return self.forward(x, params, in_features, out_features)

    def forward(self, x, params, in_features, out_features, bias=None, residual=None):
        if not self.int8_dot:
            return super().forward(x, params, in_features, out_features, bias, residual)
        from tvm.relax.frontend import nn
        from tvm.relax.frontend.nn import op

        from gptj_tvm.tir_kernels.ymm_gemm import int8_matmul

        # the kernels add the bias and the residual as they write y (as the pair kernel does)
        x_q, x_scale, x_sum = quantize_activations(x)
        extra = [t for t in (bias, residual) if t is not None]
        kernel = int8_matmul(self.int8_dot, in_features, out_features, self.scheme, GROUP, TILE, OFFSET[self.scheme],
                             bias=bias is not None, residual=residual is not None)
        name = "vnni_matmul" if self.int8_dot == "avx512-vnni" else "ymm_matmul"
        return op.tensor_ir_op(kernel, name,
                               [x_q, x_scale, x_sum, params["weight"], params["scale"], *extra],
                               nn.Tensor.placeholder([1, x.shape[1], out_features], "float32"))


Q8, Q4 = Quantized("q8"), Quantized("q4")


def quantize_activations(x):
    """x [1, n, K] -> (x_q int8, x_scale float32 [1, n, K / GROUP], x_sum int32 [1, n, K / GROUP]): per group of
    GROUP features, x_scale = max |x| / 127 (1 for an all-zero group), x_q = round half even(x / x_scale)
    (tir_kernels/vnni_gemm.quantize_activations)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    from gptj_tvm.tir_kernels import vnni_gemm

    n, k = x.shape[1], int(x.shape[2])
    kernel = vnni_gemm.quantize_activations(k, GROUP, str(x.dtype))
    return op.tensor_ir_op(kernel, "quantize_activations", [x],
                           [nn.Tensor.placeholder([1, n, k], "int8"),
                            nn.Tensor.placeholder([1, n, k // GROUP], "float32"),
                            nn.Tensor.placeholder([1, n, k // GROUP], "int32")])


def quantized_matmul(x, weight, scale, scheme: str):
    """x [b, n, in] @ W' with W' = levels x scale per group of input features; float32 result. Two reductions:
    each group's sum of x times the integer levels, then the groups' sums times their scales (the scale
    multiplies once per group, not per weight). schedules/cpu_quant.py keeps both in registers."""
    from tvm import te, tirx
    from tvm.relax.frontend.nn import op

    f32 = "float32"
    tiles, _, tile, _ = (int(s) for s in weight.shape)
    groups = int(scale.shape[1])
    offset = tirx.const(float(OFFSET[scheme]), f32)

    def level(w: te.Tensor, j, k):
        if scheme == "q8":
            return w[j // tile, k // 4, j % tile, k % 4].astype(f32) - offset
        byte = w[j // tile, k // 8, j % tile, k % 4]
        nibble = (byte >> (k % 8 // 4 * 4).astype("uint8")) & tirx.const(15, "uint8")
        return nibble.astype(f32) - offset

    def compute(x: te.Tensor, w: te.Tensor, s: te.Tensor):
        ki = te.reduce_axis((0, GROUP), name="ki")
        partial = te.compute(
            (x.shape[0], x.shape[1], groups, tiles * tile),
            lambda b, t, g, j: te.sum(x[b, t, g * GROUP + ki].astype(f32) * level(w, j, g * GROUP + ki), axis=ki),
            name="group_sum")
        gi = te.reduce_axis((0, groups), name="g")
        return te.compute(
            (x.shape[0], x.shape[1], tiles * tile),
            lambda b, t, j: te.sum(partial[b, t, gi, j] * s[j // tile, gi, j % tile].astype(f32), axis=gi),
            name="matmul")

    return op.tensor_expr_op(compute, "quantized_matmul", [x, weight, scale])
