"""The CPU attention kernels (tir_kernels/attention.py, tir_kernels/batch_attention.py) and their float math
(tir_kernels/fast_math.py) against numpy."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from gptj_tvm.core.constants import GELU_NEW_COEFF, GELU_NEW_SCALE
from gptj_tvm.tir_kernels import fast_math
from gptj_tvm.tir_kernels.attention import QUERY_BLOCK, AttentionShape, attention
from gptj_tvm.tir_kernels.batch_attention import batch_attention
from gptj_tvm.targets.llvm import host_target

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
PAD = 7  # out's columns past the heads: the kernels must leave them alone


def build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                          target=host_target())["main"]


def apply(fn, x: np.ndarray) -> np.ndarray:
    """fn over x, 16 lanes at a time (x padded to whole vectors)."""
    n = -(-len(x) // 16)

    @T.prim_func(s_tir=True)
    def main(x: T.Buffer((n * 16,), "float32"), y: T.Buffer((n * 16,), "float32")):
        for io in range(n):
            for i in T.vectorized(16):
                y[io * 16 + i] = fn(x[io * 16 + i])

    y = tvm.runtime.empty((n * 16,), "float32")
    build(main)(tvm.runtime.tensor(np.resize(x, n * 16).astype(np.float32)), y)
    return y.numpy()[:len(x)]


def ulps(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place of the expected value."""
    return np.abs(actual.astype(np.float64) - expected) / np.spacing(np.abs(expected).astype(np.float32))


def test_exp_is_within_two_ulp():
    x = np.concatenate([np.linspace(-87, 88, 200_001), [0.0, -1e-30, 1e-7]]).astype(np.float32)
    assert ulps(apply(fast_math.exp, x), np.exp(x.astype(np.float64))).max() <= 2
    # clamped, never inf or nan: softmax's masked scores (-inf) give e^-87, inputs past 88 e^88
    x = np.array([-np.inf, -1e4, 1e4, np.inf], np.float32)
    np.testing.assert_allclose(apply(fast_math.exp, x), np.exp(np.float64([-87, -87, 88, 88])), rtol=1e-6)


def test_gelu_new_within_a_few_ulp():
    """Against gelu_new in float64 (as x / (1 + e^(-2u)): 1 + tanh(u) cancels as u goes to -inf, even in
    float64): within 8 ulp from -2 up, 48 from -6, and within 4 ulp of x everywhere (further out the result is
    tiny, and float32's rounding of u, magnified by e^(-2u), leaves only its size right; float32's tanh form
    gives 0 there). transformers' tanh form in float32 is within two ulp of x of it."""
    x = np.concatenate([np.linspace(-12, 12, 100_001), -np.logspace(-8, 2, 1000), np.logspace(-8, 2, 1000),
                        [0.0, -30.0, 30.0, -200.0, 200.0]]).astype(np.float32)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):  # e^(-2u) is inf for the largest negative x: the quotient is -0
        expected = x64 / (1 + np.exp(-2 * GELU_NEW_SCALE * (x64 + GELU_NEW_COEFF * x64 ** 3)))
    actual = apply(fast_math.gelu_new, x).astype(np.float64)
    for lowest, most in ((-2, 8), (-6, 48)):  # float32's rounding of u, magnified by e^(-2u), grows with -u
        sized = (x >= lowest) & (x != 0)
        assert ulps(actual[sized], expected[sized]).max() <= most
    assert (np.abs(actual - expected) <= 4 * np.spacing(np.abs(x))).all()  # further out the result is tiny
    tanh_form = 0.5 * x * (1 + np.tanh(np.float32(GELU_NEW_SCALE) * (x + np.float32(GELU_NEW_COEFF) * x ** 3)))
    assert (np.abs(actual - tanh_form) <= np.spacing(np.abs(x)) * 2).all()


def reference(q, keys, values, lengths):
    """softmax(q k^T / sqrt(D)) v per row and head in float64, row t over positions < lengths[t]."""
    n, heads, d = q.shape
    out = np.zeros((n, heads * d))
    for t, length in enumerate(lengths):
        for h in range(heads):
            scores = keys[:length, h].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(scores - scores.max())
            out[t, h * d:(h + 1) * d] = p @ values[:length, h].astype(np.float64) / p.sum()
    return out


class Kernels:
    """Both kernels built for one shape and dtype (once: kernels_for)."""

    def __init__(self, heads: int, head_dim: int, dtype: str, positions: int = 128):
        self.shape = AttentionShape(heads, head_dim, min(8, head_dim), positions, 4 * heads * head_dim)
        self.dtype, self.np_dtype = dtype, DTYPES[dtype]
        self.width = heads * head_dim + PAD
        self.sequence = build(attention(self.shape, dtype, self.width))
        self.batch = build(batch_attention(self.shape, dtype, self.width))

    def random(self, rng, *shape, scale=1.0):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(self.np_dtype)

    def run_sequence(self, q, keys, values, total):
        out = tvm.runtime.tensor(np.full((1, q.shape[0], self.width), 5, self.np_dtype))
        self.sequence(*(tvm.runtime.tensor(a) for a in (q[None], keys, values)), out, total)
        return out.numpy()[0]

    def run_batch(self, q, keys, values, slots, positions):
        out = tvm.runtime.tensor(np.full((1, q.shape[0], self.width), 5, self.np_dtype))
        self.batch(*(tvm.runtime.tensor(a) for a in (q[None], keys, values, slots, positions)), out)
        return out.numpy()[0]


@functools.lru_cache(maxsize=None)
def kernels_for(heads: int, head_dim: int, dtype: str) -> Kernels:
    return Kernels(heads, head_dim, dtype)


TOLERANCE = {"float32": 5e-6, "bfloat16": 1e-2}  # bfloat16: the output's rounding (8 bits), on values near 1


# rows: one (decode), a block of QUERY_BLOCK, blocks and the rest one by one; total > n: a prompt's chunk after
# earlier positions; head dims of 16 and 12 (4-lane sums) and 6 (2 lanes)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (3, 12), (5, 6)])
@pytest.mark.parametrize("n,total", [(1, 1), (1, 37), (QUERY_BLOCK, QUERY_BLOCK), (13, 13), (21, 100)])
def test_attention_against_numpy_and_row_by_row(dtype, heads, head_dim, n, total):
    """Each row against numpy, and bitwise what the kernel gives that row alone (as decode computes it): a
    row's arithmetic does not depend on the block it is computed in."""
    kernels = kernels_for(heads, head_dim, dtype)
    rng = np.random.default_rng(n * total)
    keys, values = kernels.random(rng, 128, heads, head_dim), kernels.random(rng, 128, heads, head_dim)
    q = kernels.random(rng, n, heads, head_dim, scale=3.0)  # scores far from uniform
    out = kernels.run_sequence(q, keys, values, total)
    lengths = [total - n + t + 1 for t in range(n)]
    expected = reference(q.astype(np.float32), keys.astype(np.float32), values.astype(np.float32), lengths)
    np.testing.assert_allclose(out[:, :heads * head_dim].astype(np.float64), expected, rtol=0,
                               atol=TOLERANCE[dtype])
    assert (out[:, heads * head_dim:] == 5).all()
    for t in range(n):
        alone = kernels.run_sequence(q[t:t + 1], keys, values, lengths[t])
        np.testing.assert_array_equal(alone[0], out[t])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_attention_rows_are_what_they_are_alone(dtype):
    """A serving step's rows: a prompt chunk of one slot (a whole QUERY_BLOCK and a partial one), decode rows
    of other slots between. Each row against numpy, and bitwise the sequence kernel's for that row alone."""
    heads, head_dim, slots_n = 4, 16, 3
    kernels = kernels_for(heads, head_dim, dtype)
    rng = np.random.default_rng(1)
    keys = kernels.random(rng, slots_n, 128, heads, head_dim)
    values = kernels.random(rng, slots_n, 128, heads, head_dim)
    slots = np.array([0] * 9 + [1, 2, 1, 0, 2] + [2] * QUERY_BLOCK, np.int32)
    positions = np.array(list(range(20, 29)) + [5, 60, 6, 3, 61] + list(range(62, 62 + QUERY_BLOCK)), np.int32)
    q = kernels.random(rng, len(slots), heads, head_dim, scale=3.0)
    out = kernels.run_batch(q, keys, values, slots, positions)
    assert (out[:, heads * head_dim:] == 5).all()
    for t, (slot, position) in enumerate(zip(slots, positions)):
        expected = reference(q[t:t + 1].astype(np.float32), keys[slot].astype(np.float32),
                             values[slot].astype(np.float32), [position + 1])
        np.testing.assert_allclose(out[t, :heads * head_dim].astype(np.float64), expected[0], rtol=0,
                                   atol=TOLERANCE[dtype])
        alone = kernels.run_sequence(q[t:t + 1], keys[slot], values[slot], int(position) + 1)
        np.testing.assert_array_equal(alone[0], out[t])
