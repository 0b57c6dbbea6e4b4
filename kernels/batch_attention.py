"""attention.py's two kernels for a batch of sequences sharing a slot KV cache (the serving engine's step).

Every row t of the batch is one token of some sequence: `slots[t]` says which sequence's cache it belongs to,
`positions[t]` where in that sequence it stands. A step may hold one token of each running sequence (batched
decode) and a chunk of consecutive tokens of another (chunked prefill), in any order. The caches are one
[slots, capacity, n_head, head_dim] tensor per layer for keys and one for values, written in place.

Per row, the arithmetic is attention.py's in the same order (a score's lanes summed last, the maximum, then
the exponentials and the weighted sum), so a sequence's logits do not depend on what else is in the batch.
"""

from __future__ import annotations

from tvm.runtime import DataType
from tvm.script import tirx as T

from .attention import AHEAD, PARTS, AttentionShape, gelu_new, rotate
from .common import HAND_SCHEDULED, prefetch


def batch_rotary_append(config: AttentionShape, dtype: str, width: int, ffn_offset: int | None):
    """(qkv [1, n, width] float32, cos, sin, k_cache, v_cache, slots [n], positions [n]) -> (k_cache, v_cache,
    q, out): attention.rotary_append with row t at positions[t] of slot slots[t]."""
    H, D, R, P, d = config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.n_embd
    ff = config.d_ff
    ff_part = -(-ff // PARTS)
    heads_part = -(-H // PARTS)
    out_width = d + ff if ffn_offset is not None else d

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_qkv: T.handle, cos: T.Buffer((P, R // 2), "float32"), sin: T.Buffer((P, R // 2), "float32"),
               var_k: T.handle, var_v: T.handle, var_slots: T.handle, var_positions: T.handle,
               var_q: T.handle, var_out: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        num_slots = T.int64()
        capacity = T.int64()
        k_cache = T.match_buffer(var_k, (num_slots, capacity, H, D), dtype)
        v_cache = T.match_buffer(var_v, (num_slots, capacity, H, D), dtype)
        slots = T.match_buffer(var_slots, (n,), "int32")
        positions = T.match_buffer(var_positions, (n,), "int32")
        qkv = T.match_buffer(var_qkv, (1, n, width), "float32")
        q = T.match_buffer(var_q, (1, n, H, D), dtype)
        out = T.match_buffer(var_out, (1, n, out_width), dtype)
        for tp in T.parallel(n * PARTS):
            with T.sblock("batch_rotary_append"):
                T.reads(qkv[0, 0:n, 0:width], cos[0:P, 0:R // 2], sin[0:P, 0:R // 2], slots[0:n], positions[0:n])
                T.writes(q[0, 0:n, 0:H, 0:D], k_cache[0:num_slots, 0:capacity, 0:H, 0:D],
                         v_cache[0:num_slots, 0:capacity, 0:H, 0:D], out[0, 0:n, 0:out_width])
                t: T.let[T.int64] = tp // PARTS
                part: T.let[T.int32] = T.Cast("int32", tp % PARTS)
                slot: T.let[T.int64] = T.Cast("int64", slots[t])
                pos: T.let[T.int64] = T.Cast("int64", positions[t])
                for step, j in T.grid(heads_part, D):  # heads part, part + PARTS, ...
                    if part + step * PARTS < H:
                        h = part + step * PARTS
                        if j < R:
                            q[0, t, h, j] = T.Cast(dtype, rotate(qkv, t, h * D, j, cos, sin, pos))
                            k_cache[slot, pos, h, j] = T.Cast(dtype, rotate(qkv, t, d + h * D, j, cos, sin, pos))
                        else:
                            q[0, t, h, j] = T.Cast(dtype, qkv[0, t, h * D + j])
                            k_cache[slot, pos, h, j] = T.Cast(dtype, qkv[0, t, d + h * D + j])
                        v_cache[slot, pos, h, j] = T.Cast(dtype, qkv[0, t, 2 * d + h * D + j])
                if ffn_offset is not None:
                    for c in range(ff_part):
                        if part * ff_part + c < ff:
                            out[0, t, d + part * ff_part + c] = T.Cast(
                                dtype, gelu_new(qkv[0, t, ffn_offset + part * ff_part + c]))

    return kernel


def batch_attention(config: AttentionShape, dtype: str, out_width: int):
    """(q [1, n, n_head, head_dim], k_cache, v_cache, slots [n], positions [n], out [1, n, out_width]) -> out,
    with out[:, t, :n_embd] = softmax(q k^T / sqrt(head_dim)) v over positions 0 .. positions[t] of slot
    slots[t] (attention.attention's arithmetic). Written in place: out may already hold other columns."""
    H, D, P = config.n_head, config.head_dim, config.n_positions
    scale = float(1.0 / (D ** 0.5))
    L = next(lanes for lanes in (16, 8, 4, 2, 1) if D % lanes == 0)
    per_line = 64 // (DataType(dtype).bits // 8)
    lines = max(1, D // per_line)

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_slots: T.handle, var_positions: T.handle,
               var_out: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        num_slots = T.int64()
        capacity = T.int64()
        k_cache = T.match_buffer(var_k, (num_slots, capacity, H, D), dtype)
        v_cache = T.match_buffer(var_v, (num_slots, capacity, H, D), dtype)
        slots = T.match_buffer(var_slots, (n,), "int32")
        positions = T.match_buffer(var_positions, (n,), "int32")
        q = T.match_buffer(var_q, (1, n, H, D), dtype)
        out = T.match_buffer(var_out, (1, n, out_width), dtype)
        for th in T.parallel(n * H):
            with T.sblock("batch_attention"):
                T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:num_slots, 0:capacity, 0:H, 0:D],
                        v_cache[0:num_slots, 0:capacity, 0:H, 0:D], slots[0:n], positions[0:n])
                T.writes(out[0, 0:n, 0:out_width])
                scores = T.sblock_alloc_buffer((P,), "float32", scope="local")
                query = T.sblock_alloc_buffer((D,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((D,), "float32", scope="local")
                stats = T.sblock_alloc_buffer((2,), "float32", scope="local")  # running max, then sum
                part = T.sblock_alloc_buffer((L,), "float32", scope="local")
                t: T.let[T.int64] = th // H
                h: T.let[T.int64] = th % H
                slot: T.let[T.int64] = T.Cast("int64", slots[t])
                length: T.let[T.int64] = T.Cast("int64", positions[t]) + 1
                for jo in range(D // L):
                    for j in T.vectorized(L):
                        query[jo * L + j] = T.Cast("float32", q[0, t, h, jo * L + j])
                        acc[jo * L + j] = T.float32(0)
                stats[0] = T.min_value("float32")
                for pos in range(length):
                    for line in T.unroll(lines):
                        prefetch(k_cache[slot, T.min(pos + AHEAD, length - 1), h, line * per_line])
                    for j in T.vectorized(L):
                        part[j] = T.float32(0)
                    for jo in range(D // L):
                        for j in T.vectorized(L):
                            part[j] = part[j] + query[jo * L + j] * T.Cast("float32",
                                                                           k_cache[slot, pos, h, jo * L + j])
                    scores[pos] = T.float32(0)
                    for j in range(L):
                        scores[pos] = scores[pos] + part[j]
                    scores[pos] = scores[pos] * T.float32(scale)
                    stats[0] = T.max(stats[0], scores[pos])
                stats[1] = T.float32(0)
                for pos in range(length):
                    for line in T.unroll(lines):
                        prefetch(v_cache[slot, T.min(pos + AHEAD, length - 1), h, line * per_line])
                    scores[pos] = T.exp(scores[pos] - stats[0])
                    stats[1] = stats[1] + scores[pos]
                    for jo in range(D // L):
                        for j in T.vectorized(L):
                            acc[jo * L + j] = acc[jo * L + j] + scores[pos] * T.Cast(
                                "float32", v_cache[slot, pos, h, jo * L + j])
                for jo in range(D // L):
                    for j in T.vectorized(L):
                        out[0, t, h * D + jo * L + j] = T.Cast(dtype, acc[jo * L + j] / stats[1])

    return kernel
