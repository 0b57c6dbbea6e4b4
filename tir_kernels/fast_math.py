"""float32 exp and GPT-J's gelu_new in plain arithmetic, so that LLVM vectorizes them in the CPU kernels.

`T.exp` and `T.tanh` become one libm call per element on the CPU (no vector math library is linked), which left
the prefill's gelu_new (d_ff values per token) and attention's softmax (a value per query and position) as scalar
loops that took a fifth of a bfloat16 prefill. Both functions here are elementwise expressions: the same value
whether LLVM computes an element alone or in a vector.
"""

from __future__ import annotations

from tvm.script import tirx as T

from gptj_tvm.core.constants import GELU_NEW_COEFF, GELU_NEW_SCALE

# Cephes' expf: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts so that n ln2_hi is exact),
# e^r = 1 + r + r^2 p(r) on |r| <= ln 2 / 2; within 2 ulp of e^x
LOG2E = 1.44269504088896341
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1)
EXP_LOWEST = -87.0  # 2^n stays a normal float down to n = -126: e^-87 is 1.6e-38
EXP_HIGHEST = 88.0  # e^88 = 1.7e38 < float32's largest


def exp(x):
    """e^x for a float32 expression x, clamped to [EXP_LOWEST, EXP_HIGHEST] (so e^-inf is 1.6e-38, not 0)."""
    x = T.min(T.max(x, T.float32(EXP_LOWEST)), T.float32(EXP_HIGHEST))
    n = T.floor(x * T.float32(LOG2E) + T.float32(0.5))
    r = x - n * T.float32(LN2_HI) - n * T.float32(LN2_LO)
    p = T.float32(EXP_POLYNOMIAL[0])
    for coefficient in EXP_POLYNOMIAL[1:]:
        p = p * r + T.float32(coefficient)
    power = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return (p * (r * r) + r + T.float32(1)) * power


def gelu_new(x):
    """GPT-J's gelu_new, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), as x / (1 + e^(-2u)): the
    same function without tanh's cancellation near 0, within a few ulp. Large |x| clamps the exponential, which
    gives x itself and 0 (-x e^-88) as tanh does."""
    u = T.float32(GELU_NEW_SCALE) * (x + T.float32(GELU_NEW_COEFF) * x * x * x)
    return x / (T.float32(1) + exp(T.float32(-2) * u))
