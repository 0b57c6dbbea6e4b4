"""attention.py's two kernels for a batch of sequences sharing a slot KV cache (the serving engine's step).

Every row t of the batch is one token of some sequence: `slots[t]` says which sequence's cache it belongs to,
`positions[t]` where in that sequence it stands. A step may hold one token of each running sequence (batched
decode) and a chunk of consecutive tokens of another (chunked prefill), in any order. The caches are one
[slots, capacity, n_head, head_dim] tensor per layer for keys and one for values, written in place.

Per row, the arithmetic is attention.py's (the same macros), so a sequence's logits do not depend on what else
is in the batch.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .attention import PARTS, QUERY_BLOCK, AttentionShape, attend_rows, ffn_gelu, rotate
from .common import HAND_SCHEDULED


def batch_rotary_append(config: AttentionShape, dtype: str, width: int, ffn_offset: int | None):
    """(qkv [1, n, width] float32, cos, sin, k_cache, v_cache, slots [n], positions [n]) -> (k_cache, v_cache,
    q, out): attention.rotary_append with row t at positions[t] of slot slots[t]."""
    H, D, R, P, d = config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.n_embd
    heads_part = -(-H // PARTS)
    out_width = d + config.d_ff if ffn_offset is not None else d
    gelu_columns = ffn_gelu(config, dtype, ffn_offset)

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
                    gelu_columns(qkv, out, t, part)

    return kernel


def batch_attention(config: AttentionShape, dtype: str, out_width: int):
    """(q [1, n, n_head, head_dim], k_cache, v_cache, slots [n], positions [n], out [1, n, out_width]) -> out,
    with out[:, t, :n_embd] = softmax(q k^T / sqrt(head_dim)) v over positions 0 .. positions[t] of slot
    slots[t] (attention.attend_rows' arithmetic). Written in place: out may already hold other columns. A task is
    one head of QUERY_BLOCK consecutive rows: one attend_rows block where they all belong to one slot (a prompt's
    chunk), else row by row."""
    H, D = config.n_head, config.head_dim
    attend = attend_rows(config, dtype)

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
        tasks: T.let[T.int64] = (n + QUERY_BLOCK - 1) // QUERY_BLOCK
        for task in T.parallel(H * tasks):
            with T.sblock("batch_attention"):
                T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:num_slots, 0:capacity, 0:H, 0:D],
                        v_cache[0:num_slots, 0:capacity, 0:H, 0:D], slots[0:n], positions[0:n])
                T.writes(out[0, 0:n, 0:out_width])
                lengths = T.sblock_alloc_buffer((QUERY_BLOCK,), "int64", scope="local")
                longest = T.sblock_alloc_buffer((1,), "int64", scope="local")
                h: T.let[T.int64] = task // tasks
                t0: T.let[T.int64] = task % tasks * QUERY_BLOCK
                shared = T.sblock_alloc_buffer((1,), "int32", scope="local")  # whether the block is one slot's
                shared[0] = T.int32(0)
                if t0 + QUERY_BLOCK <= n:
                    shared[0] = T.int32(1)
                    longest[0] = T.int64(0)
                    for i in range(QUERY_BLOCK):
                        if slots[t0 + i] != slots[t0]:
                            shared[0] = T.int32(0)
                        lengths[i] = T.Cast("int64", positions[t0 + i]) + 1
                        longest[0] = T.max(longest[0], lengths[i])
                if shared[0] == 1:
                    slot_offset: T.let[T.int64] = T.Cast("int64", slots[t0]) * capacity * H * D
                    keys = T.decl_buffer((capacity, H, D), dtype, data=k_cache.data, elem_offset=slot_offset)
                    values = T.decl_buffer((capacity, H, D), dtype, data=v_cache.data, elem_offset=slot_offset)
                    attend(q, keys, values, out, t0, QUERY_BLOCK, h, lengths, longest[0])
                else:
                    for t in range(t0, T.min(t0 + QUERY_BLOCK, n)):
                        row_offset: T.let[T.int64] = T.Cast("int64", slots[t]) * capacity * H * D
                        row_keys = T.decl_buffer((capacity, H, D), dtype, data=k_cache.data,
                                                 elem_offset=row_offset)
                        row_values = T.decl_buffer((capacity, H, D), dtype, data=v_cache.data,
                                                   elem_offset=row_offset)
                        lengths[0] = T.Cast("int64", positions[t]) + 1
                        attend(q, row_keys, row_values, out, t, 1, h, lengths, lengths[0])

    return kernel
