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

Stored layout, per linear (made for AVX-512 VNNI, frontend/x86_gemm.py): the levels unsigned, q + OFFSET,
in column tiles of TILE outputs, four consecutive input features of one output in one 32-bit word:
    q8: uint8 [out / TILE, in / 4, TILE, 4]          byte [t, i, c, r] = q[4i + r, t TILE + c] + 128
    q4: uint8 [out / TILE, in / 8, TILE, 4]          low nibble: q[8i + r, .] + 8, high nibble: q[8i + 4 + r, .] + 8
and the scales float16 [out / TILE, in / GROUP, TILE].
"""

from __future__ import annotations

import numpy as np

from gptj_tvm.errors import GptjError

SCHEMES = ("q8", "q4")
GROUP = 32
TILE = 64  # 64 float32 accumulators per strip: 4 AVX-512 registers, plus 4 for the group's partial sums
QMAX = {"q8": 127, "q4": 7}
QMIN = {"q8": -127, "q4": -8}
OFFSET = {"q8": 128, "q4": 8}
FEATURES_PER_ROW = {"q8": 4, "q4": 8}  # input features in one [.., TILE, 4] row of the stored levels
LM_HEAD = "q8"


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
