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

from .common import HAND_SCHEDULED, prefetch

# rotary_append splits each token's heads and FFN columns this many ways: a decode step has one token, and its
# gelu_new over d_ff columns (a libm expf per column: LLVM does not vectorize it) took 0.16-0.25 ms on one
# thread, 5-7 ms of a GPT-J-6B token
PARTS = 8


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
    ff = config.d_ff
    ff_part = -(-ff // PARTS)
    heads_part = -(-H // PARTS)
    out_width = d + ff if ffn_offset is not None else d

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
                    for c in range(ff_part):
                        if part * ff_part + c < ff:
                            out[0, t, d + part * ff_part + c] = T.Cast(
                                dtype, gelu_new(qkv[0, t, ffn_offset + part * ff_part + c]))

    return kernel


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


def gelu_new(x):
    return T.float32(0.5) * x * (T.float32(1.0) + T.tanh(
        T.float32(GELU_NEW_SCALE) * (x + T.float32(GELU_NEW_COEFF) * x * x * x)))


def attention(config: AttentionShape, dtype: str, out_width: int):
    """(q [1, n, n_head, head_dim], k_cache, v_cache, out [1, n, out_width], total) -> out, with
    out[:, t, :n_embd] = causal softmax(q k^T / sqrt(head_dim)) v over cache positions 0 .. total - n + t,
    scores, softmax and the weighted sum in float32. Written in place: out may already hold other columns."""
    H, D, P = config.n_head, config.head_dim, config.n_positions
    scale = float(1.0 / (D ** 0.5))
    L = next(lanes for lanes in (16, 8, 4, 2, 1) if D % lanes == 0)  # float32 lanes the head dim splits into
    per_line = 64 // (DataType(dtype).bits // 8)  # KV-cache elements per 64-byte line
    lines = max(1, D // per_line)

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
        for th in T.parallel(n * H):
            with T.sblock("attention"):
                T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:capacity, 0:H, 0:D], v_cache[0:capacity, 0:H, 0:D])
                T.writes(out[0, 0:n, 0:out_width])
                scores = T.sblock_alloc_buffer((P,), "float32", scope="local")
                query = T.sblock_alloc_buffer((D,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((D,), "float32", scope="local")
                stats = T.sblock_alloc_buffer((2,), "float32", scope="local")  # running max, then sum
                part = T.sblock_alloc_buffer((L,), "float32", scope="local")  # a score's lanes, summed last
                t: T.let[T.int64] = th // H
                h: T.let[T.int64] = th % H
                length: T.let[T.int64] = total - n + t + 1
                for jo in range(D // L):
                    for j in T.vectorized(L):
                        query[jo * L + j] = T.Cast("float32", q[0, t, h, jo * L + j])
                        acc[jo * L + j] = T.float32(0)
                stats[0] = T.min_value("float32")
                for pos in range(length):
                    # one head's rows lie n_embd elements apart (8 KiB in bfloat16 for GPT-J-6B), each in
                    # another page, where the hardware prefetchers stop: ask for the row AHEAD positions on
                    for line in T.unroll(lines):
                        prefetch(k_cache[T.min(pos + AHEAD, length - 1), h, line * per_line])
                    for j in T.vectorized(L):
                        part[j] = T.float32(0)
                    for jo in range(D // L):
                        for j in T.vectorized(L):
                            part[j] = part[j] + query[jo * L + j] * T.Cast("float32", k_cache[pos, h, jo * L + j])
                    scores[pos] = T.float32(0)
                    for j in range(L):
                        scores[pos] = scores[pos] + part[j]
                    scores[pos] = scores[pos] * T.float32(scale)
                    stats[0] = T.max(stats[0], scores[pos])
                stats[1] = T.float32(0)
                for pos in range(length):
                    for line in T.unroll(lines):
                        prefetch(v_cache[T.min(pos + AHEAD, length - 1), h, line * per_line])
                    scores[pos] = T.exp(scores[pos] - stats[0])
                    stats[1] = stats[1] + scores[pos]
                    for jo in range(D // L):
                        for j in T.vectorized(L):
                            acc[jo * L + j] = acc[jo * L + j] + scores[pos] * T.Cast(
                                "float32", v_cache[pos, h, jo * L + j])
                for jo in range(D // L):
                    for j in T.vectorized(L):
                        out[0, t, h * D + jo * L + j] = T.Cast(dtype, acc[jo * L + j] / stats[1])

    return kernel
