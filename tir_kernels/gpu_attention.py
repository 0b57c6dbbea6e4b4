"""attention.py's two kernels in thread-block form, for GPUs: same arguments, same results.

Each kernel is a grid of blocks (blockIdx.x) of THREADS threads (threadIdx.x). Work inside a block runs in
phases, one `threads(...)` loop each, communicating through block-shared buffers: TVM's ThreadSync pass puts a
barrier between phases where one reads what another wrote. Because every phase is a complete loop over the
threads, the same kernel with the grid as a parallel loop and the threads as a serial loop (`Loops(gpu=False)`)
computes exactly the same thing on a CPU: that is how the tests check these kernels' math without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from .attention import AttentionShape, gelu_new, rotate_append_element
from .common import HAND_SCHEDULED

THREADS = 128
REDUCTION_STEPS = THREADS.bit_length() - 1  # log2(THREADS)


@dataclass(frozen=True)
class Loops:
    """How the grid and the threads of a block are expressed: GPU bindings, or CPU loops with the same meaning."""
    gpu: bool = True

    def grid(self, extent):
        return T.thread_binding(extent, thread="blockIdx.x") if self.gpu else T.parallel(extent)

    def threads(self, extent):
        return T.thread_binding(extent, thread="threadIdx.x") if self.gpu else T.serial(extent)

    @property
    def shared(self) -> str:
        return "shared" if self.gpu else "global"


def rotary_append(config: AttentionShape, dtype: str, width: int, ffn_offset: int | None, loops: Loops = Loops()):
    """attention.rotary_append with one thread per output element: element i < n_embd of token t rotates q and k
    (head i // head_dim, column i % head_dim) and appends k and v; element n_embd + c is gelu_new of FFN
    column c."""
    H, D, R, P, d = config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.n_embd
    ff = config.d_ff
    out_width = d + ff if ffn_offset is not None else d
    chunks = (out_width + THREADS - 1) // THREADS

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
        for b in loops.grid(n * chunks):
            for tx in loops.threads(THREADS):
                with T.sblock("rotary_append"):
                    T.reads(qkv[0, 0:n, 0:width], cos[0:P, 0:R // 2], sin[0:P, 0:R // 2])
                    T.writes(q[0, 0:n, 0:H, 0:D], k_cache[0:capacity, 0:H, 0:D], v_cache[0:capacity, 0:H, 0:D],
                             out[0, 0:n, 0:out_width])
                    t: T.let[T.int64] = b // chunks
                    i: T.let[T.int64] = b % chunks * THREADS + tx
                    pos: T.let[T.int64] = total - n + t
                    if i < d:
                        h: T.let[T.int64] = i // D
                        j: T.let[T.int64] = i % D
                        rotate_append_element(qkv, cos, sin, q, k_cache, v_cache, t, h, j, pos, R, d, D, dtype)
                    elif ffn_offset is not None and i < out_width:
                        out[0, t, i] = T.Cast(dtype, gelu_new(qkv[0, t, ffn_offset + i - d]))

    return kernel


def batch_rotary_append(config: AttentionShape, dtype: str, width: int, ffn_offset: int | None,
                        loops: Loops = Loops()):
    """rotary_append for the serving engine's step (batch_attention.py's arguments): row t at positions[t] of
    cache slot slots[t], through a [capacity, n_head, head_dim] view of that slot."""
    H, D, R, P, d = config.n_head, config.head_dim, config.rotary_dim, config.n_positions, config.n_embd
    out_width = d + config.d_ff if ffn_offset is not None else d
    chunks = (out_width + THREADS - 1) // THREADS

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
        for b in loops.grid(n * chunks):
            for tx in loops.threads(THREADS):
                with T.sblock("batch_rotary_append"):
                    T.reads(qkv[0, 0:n, 0:width], cos[0:P, 0:R // 2], sin[0:P, 0:R // 2], slots[0:n],
                            positions[0:n])
                    T.writes(q[0, 0:n, 0:H, 0:D], k_cache[0:num_slots, 0:capacity, 0:H, 0:D],
                             v_cache[0:num_slots, 0:capacity, 0:H, 0:D], out[0, 0:n, 0:out_width])
                    t: T.let[T.int64] = b // chunks
                    i: T.let[T.int64] = b % chunks * THREADS + tx
                    pos: T.let[T.int64] = T.Cast("int64", positions[t])
                    slot_offset: T.let[T.int64] = T.Cast("int64", slots[t]) * capacity * H * D
                    keys = T.decl_buffer((capacity, H, D), dtype, data=k_cache.data, elem_offset=slot_offset)
                    values = T.decl_buffer((capacity, H, D), dtype, data=v_cache.data, elem_offset=slot_offset)
                    if i < d:
                        h: T.let[T.int64] = i // D
                        j: T.let[T.int64] = i % D
                        rotate_append_element(qkv, cos, sin, q, keys, values, t, h, j, pos, R, d, D, dtype)
                    elif ffn_offset is not None and i < out_width:
                        out[0, t, i] = T.Cast(dtype, gelu_new(qkv[0, t, ffn_offset + i - d]))

    return kernel


def attention(config: AttentionShape, dtype: str, out_width: int, loops: Loops = Loops(), batched: bool = False):
    """kernels.attention with one block per (token, head). Phases: load q; each thread scores a strided share
    of the positions (kept in shared memory) and keeps their max; a tree reduction gives the block's max;
    exp, and a tree sum; each thread then owns head columns and sums probability x v over the positions."""
    H, D, P = config.n_head, config.head_dim, config.n_positions
    scale = float(1.0 / (D ** 0.5))
    d_chunks = (D + THREADS - 1) // THREADS
    p_padded = (P + THREADS - 1) // THREADS * THREADS

    # Only the reduction trees store to shared memory under a condition (ThreadSync cannot place a barrier
    # inside one): shared buffers are padded to whole rounds of THREADS, threads past the end compute on
    # clamped indices and store where nobody reads, and the sums mask them out.
    @T.macro
    def attend(q, k_cache, v_cache, out, t, h, length):
        """out[0, t, head h] = attention of token t's head h over positions 0 .. length - 1 of the caches."""
        scores = T.sblock_alloc_buffer((p_padded,), "float32", scope=loops.shared)
        query = T.sblock_alloc_buffer((d_chunks * THREADS,), "float32", scope=loops.shared)
        block_max = T.sblock_alloc_buffer((THREADS,), "float32", scope=loops.shared)
        block_sum = T.sblock_alloc_buffer((THREADS,), "float32", scope=loops.shared)
        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
        for tx in loops.threads(THREADS):
            for c in range(d_chunks):
                query[c * THREADS + tx] = T.Cast("float32", q[0, t, h, T.min(c * THREADS + tx, D - 1)])
        for tx in loops.threads(THREADS):
            block_max[tx] = T.min_value("float32")
            for c in range((length + THREADS - 1) // THREADS):
                acc[0] = T.float32(0)
                for j in range(D):
                    acc[0] = acc[0] + query[j] * T.Cast(
                        "float32", k_cache[T.min(c * THREADS + tx, length - 1), h, j])
                scores[c * THREADS + tx] = acc[0] * T.float32(scale)
                block_max[tx] = T.max(block_max[tx], acc[0] * T.float32(scale))
        for step in range(REDUCTION_STEPS):
            for tx in loops.threads(THREADS):
                if tx < T.shift_right(THREADS // 2, step):
                    block_max[tx] = T.max(block_max[tx], block_max[tx + T.shift_right(THREADS // 2, step)])
        for tx in loops.threads(THREADS):
            block_sum[tx] = T.float32(0)
            for c in range((length + THREADS - 1) // THREADS):
                scores[c * THREADS + tx] = T.exp(scores[c * THREADS + tx] - block_max[0])
                block_sum[tx] = block_sum[tx] + T.if_then_else(
                    c * THREADS + tx < length, scores[c * THREADS + tx], T.float32(0))
        for step in range(REDUCTION_STEPS):
            for tx in loops.threads(THREADS):
                if tx < T.shift_right(THREADS // 2, step):
                    block_sum[tx] = block_sum[tx] + block_sum[tx + T.shift_right(THREADS // 2, step)]
        for tx in loops.threads(THREADS):
            for c in range(d_chunks):
                acc[0] = T.float32(0)
                for pos in range(length):
                    acc[0] = acc[0] + scores[pos] * T.Cast(
                        "float32", v_cache[pos, h, T.min(c * THREADS + tx, D - 1)])
                if c * THREADS + tx < D:
                    out[0, t, h * D + c * THREADS + tx] = T.Cast(dtype, acc[0] / block_sum[0])

    if batched:
        @T.prim_func(private=True, s_tir=True)
        def batch_kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_slots: T.handle,
                         var_positions: T.handle, var_out: T.handle):
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
            for th in loops.grid(n * H):
                with T.sblock("batch_attention"):
                    T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:num_slots, 0:capacity, 0:H, 0:D],
                            v_cache[0:num_slots, 0:capacity, 0:H, 0:D], slots[0:n], positions[0:n])
                    T.writes(out[0, 0:n, 0:out_width])
                    t: T.let[T.int64] = th // H
                    slot_offset: T.let[T.int64] = T.Cast("int64", slots[t]) * capacity * H * D
                    keys = T.decl_buffer((capacity, H, D), dtype, data=k_cache.data, elem_offset=slot_offset)
                    values = T.decl_buffer((capacity, H, D), dtype, data=v_cache.data, elem_offset=slot_offset)
                    attend(q, keys, values, out, t, th % H, T.Cast("int64", positions[t]) + 1)

        return batch_kernel

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
        for th in loops.grid(n * H):
            with T.sblock("attention"):
                T.reads(q[0, 0:n, 0:H, 0:D], k_cache[0:capacity, 0:H, 0:D], v_cache[0:capacity, 0:H, 0:D])
                T.writes(out[0, 0:n, 0:out_width])
                attend(q, k_cache, v_cache, out, th // H, th % H, total - n + th // H + 1)

    return kernel
