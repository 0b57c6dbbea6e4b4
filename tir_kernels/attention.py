"""GPT-J's attention kernels, written in TIR: rotary + KV-cache append in one kernel, attention in another.

The KV cache is one [n_positions, n_head, head_dim] tensor per layer for keys and one for values, owned by the
runtime and written in place (`call_tir_inplace`), so a decode step copies nothing but the new token's k and v.
Both kernels come already scheduled (parallel over the outer loop); the schedule rules leave them alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.runtime import DataType
from tvm.script import tirx as T

from gptj_tvm.core.constants import GELU_NEW_COEFF, GELU_NEW_SCALE

from . import fast_math
from .common import HAND_SCHEDULED, fold_lanes, prefetch

# rotary_append splits each token's heads and FFN columns this many ways, so that a decode step's one token
# keeps every thread busy (gelu_new over d_ff columns took 5-7 ms of a GPT-J-6B token on one thread when it
# called libm per column)
PARTS = 8
GELU_LANES = 16  # float32 lanes of an AVX-512 register


@dataclass(frozen=True)
class AttentionShape:
    """What the attention kernels need of a model, as plain numbers (kernels know nothing of configs)."""
    n_head: int
    head_dim: int
    rotary_dim: int
    n_positions: int
    d_ff: int

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_dim


def rotary_append(config: AttentionShape, dtype: str, width: int, ffn_offset: int | None):
    """(qkv [1, n, width] float32, cos, sin, k_cache, v_cache, total) -> (k_cache, v_cache, q, out).

    qkv holds q | k | v (| f) side by side. q and k get GPT-J's interleaved rotary at positions total - n ..
    total - 1; k and v are written into the caches at those positions, q into q [1, n, n_head, head_dim].
    With ffn_offset, out[:, :, d:] = gelu_new(qkv[:, :, ffn_offset:]) (the FFN half of the block's W_out input;
    attention later fills out[:, :, :d])."""
    H, D, R, P, d = config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.n_embd
    heads_part = -(-H // PARTS)
    out_width = d + config.d_ff if ffn_offset is not None else d
    gelu_columns = ffn_gelu(config, dtype, ffn_offset)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_qkv: T.handle, cos: T.Buffer((P, R // 2), "float32"), sin: T.Buffer((P, R // 2), "float32"),
               var_k: T.handle, var_v: T.handle, total: T.int64,
               var_q: T.handle, var_out: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        capacity = T.int64()  # the caches' positions: the runtime sizes them to the sequence
        k_cache = T.match_buffer(var_k, (capacity, H, D), dtype)
        v_cache = T.match_buffer(var_v, (capacity, H, D), dtype)
        qkv = T.match_buffer(var_qkv, (1, n, width), "float32")
        q = T.match_buffer(var_q, (1, n, H, D), dtype)
        out = T.match_buffer(var_out, (1, n, out_width), dtype)
        for tp in T.parallel(n * PARTS):
            with T.sblock("rotary_append"):
                T.reads(qkv[0, 0:n, 0:width], cos[0:P, 0:R // 2], sin[0:P, 0:R // 2])
                T.writes(q[0, 0:n, 0:H, 0:D], k_cache[0:capacity, 0:H, 0:D], v_cache[0:capacity, 0:H, 0:D],
                         out[0, 0:n, 0:out_width])
                t: T.let[T.int64] = tp // PARTS
                part: T.let[T.int32] = T.Cast("int32", tp % PARTS)
                pos: T.let[T.int64] = total - n + t
                for step, j in T.grid(heads_part, D):  # heads part, part + PARTS, ...
                    if part + step * PARTS < H:
                        rotate_append_element(qkv, cos, sin, q, k_cache, v_cache, t, part + step * PARTS, j, pos,
                                              R, d, D, dtype)
                if ffn_offset is not None:
                    gelu_columns(qkv, out, t, part)

    return kernel


def ffn_gelu(config: AttentionShape, dtype: str, ffn_offset: int | None):
    """A T.macro gelu_columns(qkv, out, t, part): out[0, t, n_embd + c] = fast_math.gelu_new(qkv[0, t, ffn_offset
    + c]) for the PARTS-th share `part` of the d_ff columns, GELU_LANES columns at a time (a vector that would
    cross d_ff one by one, with the same arithmetic)."""
    d, ff = config.n_embd, config.d_ff
    share = -(-ff // PARTS)
    vectors = -(-share // GELU_LANES)

    @T.macro
    def gelu_columns(qkv, out, t, part):
        for co in range(vectors):
            first: T.let[T.int64] = T.Cast("int64", part) * share + co * GELU_LANES
            if co * GELU_LANES + GELU_LANES <= share and first + GELU_LANES <= ff:
                for c in T.vectorized(GELU_LANES):
                    out[0, t, d + first + c] = T.Cast(dtype, fast_math.gelu_new(qkv[0, t, ffn_offset + first + c]))
            else:
                for c in range(GELU_LANES):
                    if co * GELU_LANES + c < share and first + c < ff:
                        out[0, t, d + first + c] = T.Cast(dtype,
                                                          fast_math.gelu_new(qkv[0, t, ffn_offset + first + c]))

    return gelu_columns


def rotate(qkv, t, base, j, cos, sin, pos):
    x = qkv[0, t, base + j]
    partner = qkv[0, t, base + T.bitwise_xor(j, 1)]
    c = cos[pos, T.floordiv(j, 2)]
    s = sin[pos, T.floordiv(j, 2)]
    return T.if_then_else(T.floormod(j, 2) == 0, x * c - partner * s, x * c + partner * s)


@T.macro
def rotate_append_element(qkv, cos, sin, q, k_cache, v_cache, t, h, j, pos, rotary_dim, n_embd, head_dim, dtype):
    """Element (h, j) of token t: q and k rotated (the first rotary_dim columns of a head), k and v appended to
    the caches at pos. Shared by the CPU kernel above and gpu_attention.rotary_append."""
    if j < rotary_dim:
        q[0, t, h, j] = T.Cast(dtype, rotate(qkv, t, h * head_dim, j, cos, sin, pos))
        k_cache[pos, h, j] = T.Cast(dtype, rotate(qkv, t, n_embd + h * head_dim, j, cos, sin, pos))
    else:
        q[0, t, h, j] = T.Cast(dtype, qkv[0, t, h * head_dim + j])
        k_cache[pos, h, j] = T.Cast(dtype, qkv[0, t, n_embd + h * head_dim + j])
    v_cache[pos, h, j] = T.Cast(dtype, qkv[0, t, 2 * n_embd + h * head_dim + j])


AHEAD = 4  # cache positions
QUERY_BLOCK = 8  # a sequence's consecutive rows per task: each key and value row read and widened serves them all


def gelu_new(x):
    """tanh's form, for the GPU kernels; the CPU kernels take fast_math.gelu_new, which vectorizes."""
    return T.float32(0.5) * x * (T.float32(1.0) + T.tanh(
        T.float32(GELU_NEW_SCALE) * (x + T.float32(GELU_NEW_COEFF) * x * x * x)))


def attend_rows(config: AttentionShape, dtype: str):
    """A T.macro attend(q, keys, values, out, t0, count, h, lengths, longest): out[0, t0 + i, head h's columns]
    for i < count (a Python int), row t0 + i attending to positions 0 .. lengths[i] - 1 of keys and values,
    [capacity, n_head, head_dim] views of one sequence's cache; longest is the largest of lengths.

    Per row, in float32: scores = (q . k) / sqrt(head_dim), the dot summed in L lanes over the head and the lanes
    halved pairwise; the maximum; p = exp(score - maximum) (fast_math.exp); the sum of p in L lanes, halved
    pairwise; out = (sum over positions, in order, of p v) / sum. Positions past a row's length (up to longest)
    get p = 0, which adds exactly nothing, so a row's result does not depend on `count` or the other rows."""
    D, P = config.head_dim, config.n_positions
    scale = float(1.0 / (D ** 0.5))
    L = next(lanes for lanes in (16, 8, 4, 2, 1) if D % lanes == 0)  # float32 lanes the head dim splits into
    padded = -(-P // L) * L  # a row's scores in whole vectors
    per_line = 64 // (DataType(dtype).bits // 8)  # KV-cache elements per 64-byte line
    lines = max(1, D // per_line)

    @T.macro
    def attend(q, keys, values, out, t0, count, h, lengths, longest):
        query = T.sblock_alloc_buffer((count * D,), "float32", scope="local")
        scores = T.sblock_alloc_buffer((count * padded,), "float32", scope="local")
        widened = T.sblock_alloc_buffer((D,), "float32", scope="local")
        part = T.sblock_alloc_buffer((count * L,), "float32", scope="local")
        total = T.sblock_alloc_buffer((count,), "float32", scope="local")  # the maximum, then the sum of p
        acc = T.sblock_alloc_buffer((count * D,), "float32", scope="local")
        for i in T.unroll(count):
            for jo in range(D // L):
                for j in T.vectorized(L):
                    query[i * D + jo * L + j] = T.Cast("float32", q[0, t0 + i, h, jo * L + j])
        for pos in range(longest):
            # one head's rows lie n_embd elements apart (8 KiB in bfloat16 for GPT-J-6B), each in another page,
            # where the hardware prefetchers stop: ask for the row AHEAD positions on
            for line in T.unroll(lines):
                prefetch(keys[T.min(pos + AHEAD, longest - 1), h, line * per_line])
            for jo in T.unroll(D // L):
                for j in T.vectorized(L):
                    widened[jo * L + j] = T.Cast("float32", keys[pos, h, jo * L + j])
            for i in T.unroll(count):
                for j in T.vectorized(L):
                    part[i * L + j] = T.float32(0)
            for jo in T.unroll(D // L):  # the rows' sums interleaved: independent chains of additions
                for i in T.unroll(count):
                    for j in T.vectorized(L):
                        part[i * L + j] = part[i * L + j] + query[i * D + jo * L + j] * widened[jo * L + j]
            for i in T.unroll(count):
                scores[i * padded + pos] = fold_lanes(part, i * L, L, "float32") * T.float32(scale)
        for i in T.unroll(count):
            # the maximum (exact in any order), then p and its sum, L positions at a time; past lengths[i] the
            # scores are of positions this row must not see (or unwritten), and p is 0
            for j in T.vectorized(L):
                part[i * L + j] = T.min_value("float32")
            for po in range((longest + L - 1) // L):
                for j in T.vectorized(L):
                    part[i * L + j] = T.max(part[i * L + j], T.if_then_else(
                        po * L + j < lengths[i], scores[i * padded + po * L + j], T.min_value("float32")))
            total[i] = part[i * L]
            for j in range(1, L):
                total[i] = T.max(total[i], part[i * L + j])
            for j in T.vectorized(L):
                part[i * L + j] = T.float32(0)
            for po in range((longest + L - 1) // L):
                for j in T.vectorized(L):
                    scores[i * padded + po * L + j] = T.if_then_else(
                        po * L + j < lengths[i], fast_math.exp(scores[i * padded + po * L + j] - total[i]),
                        T.float32(0))
                    part[i * L + j] = part[i * L + j] + scores[i * padded + po * L + j]
            total[i] = fold_lanes(part, i * L, L, "float32")
        if count == 1:
            # one row: its head's accumulators fit in registers, and each value row is read once
            for jo in T.unroll(D // L):
                for j in T.vectorized(L):
                    acc[jo * L + j] = T.float32(0)
            for pos in range(longest):
                for line in T.unroll(lines):
                    prefetch(values[T.min(pos + AHEAD, longest - 1), h, line * per_line])
                for jo in T.unroll(D // L):
                    for j in T.vectorized(L):
                        acc[jo * L + j] = acc[jo * L + j] + scores[pos] * T.Cast("float32",
                                                                                 values[pos, h, jo * L + j])
            for jo in T.unroll(D // L):
                for j in T.vectorized(L):
                    out[0, t0, h * D + jo * L + j] = T.Cast(dtype, acc[jo * L + j] / total[0])
        else:
            # L columns of every row at a time, over all positions: each value vector widened once for the rows
            for jo in range(D // L):
                for i in T.unroll(count):
                    for j in T.vectorized(L):
                        acc[i * L + j] = T.float32(0)
                for pos in range(longest):
                    for c in T.vectorized(L):
                        widened[c] = T.Cast("float32", values[pos, h, jo * L + c])
                    for i in T.unroll(count):
                        for j in T.vectorized(L):
                            acc[i * L + j] = acc[i * L + j] + scores[i * padded + pos] * widened[j]
                for i in T.unroll(count):
                    for j in T.vectorized(L):
                        out[0, t0 + i, h * D + jo * L + j] = T.Cast(dtype, acc[i * L + j] / total[i])

    return attend


def attention(config: AttentionShape, dtype: str, out_width: int):
    """(q [1, n, n_head, head_dim], k_cache, v_cache, out [1, n, out_width], total) -> out, with
    out[:, t, :n_embd] = causal softmax(q k^T / sqrt(head_dim)) v over cache positions 0 .. total - n + t
    (attend_rows' arithmetic). Written in place: out may already hold other columns. A task is one head of
    QUERY_BLOCK consecutive rows (the rows past the last whole block one by one), heads outermost so that
    threads taking consecutive tasks get equal shares of the causal work."""
    H, D = config.n_head, config.head_dim
    attend = attend_rows(config, dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle,
               var_out: T.handle, total: T.int64):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        capacity = T.int64()  # the caches' positions: the runtime sizes them to the sequence
        k_cache = T.match_buffer(var_k, (capacity, H, D), dtype)
        v_cache = T.match_buffer(var_v, (capacity, H, D), dtype)
        q = T.match_buffer(var_q, (1, n, H, D), dtype)
        out = T.match_buffer(var_out, (1, n, out_width), dtype)
        blocks: T.let[T.int64] = n // QUERY_BLOCK
        tasks: T.let[T.int64] = blocks + n % QUERY_BLOCK
        for task in T.parallel(H * tasks):
            with T.sblock("attention"):
                T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:capacity, 0:H, 0:D], v_cache[0:capacity, 0:H, 0:D])
                T.writes(out[0, 0:n, 0:out_width])
                lengths = T.sblock_alloc_buffer((QUERY_BLOCK,), "int64", scope="local")
                h: T.let[T.int64] = task // tasks
                b: T.let[T.int64] = task % tasks
                if b < blocks:
                    for i in range(QUERY_BLOCK):
                        lengths[i] = total - n + b * QUERY_BLOCK + i + 1
                    attend(q, k_cache, v_cache, out, b * QUERY_BLOCK, QUERY_BLOCK, h, lengths,
                           lengths[QUERY_BLOCK - 1])
                else:
                    t: T.let[T.int64] = blocks * QUERY_BLOCK + b - blocks
                    lengths[0] = total - n + t + 1
                    attend(q, k_cache, v_cache, out, t, 1, h, lengths, lengths[0])

    return kernel
