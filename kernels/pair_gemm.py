"""The bfloat16 GEMM/GEMV of CPU artifacts, on weights in column pairs (frontend/layouts/column_pairs.py), in TIR.

A bfloat16 is the high half of a float32, so a 32-bit word holding two of them widens to two float32 with one
instruction each: `word << 16` (the low half) and `word & 0xFFFF0000` (the high half). The weights are stored
[out / tile, in / 2, tile, 2]: a 64-byte load holds 16 columns x 2 input features, and two float32 FMAs per
load against x[2r] and x[2r + 1] broadcast. The column-tile layout (float32 and float16 keep it), where a GEMV
widens 16 bf16 at a time from the low and the high 256 bits of a load, takes three instructions per 16
weights and left GPT-J-6B's decode GEMVs short of the read bandwidth (README, "bfloat16 column pairs", has the
measurements against the column tiles' default schedule).

One task per column tile (a contiguous run of the weight file), k in blocks of K_BLOCK pair rows (64 KiB of a
64-column tile, kept in L2 while every prompt position passes over it), the positions in blocks of ROWS (4 x 64
float32 accumulators: 16 AVX-512 registers; 6 rows overflow the stack buffer and ran at 60%), the left-over
positions one at a time. Each load of the first position block asks for the line WEIGHT_PREFETCH_BYTES
further on, as the other GEMVs do (schedules/prefetch.py).

pair_matmul: (x [1, n, K] in the model dtype, weight [N / tile, K / 2, tile, 2] bfloat16) -> y [1, n, N] float32,
y[t, c] = sum over k of x[t, k] * W[k, c], accumulated in float32 (products of bfloat16 are exact in float32),
(+ bias[c] (+ residual[t, c])) added as the last k block is written back: a fused block (model.FusedBlock) keeps
its five kernels.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .common import HAND_SCHEDULED, WEIGHT_PREFETCH_BYTES, WEIGHT_PREFETCH_LOCALITY, prefetch

LANES = 16  # float32 lanes of a 512-bit register
ROWS = 4  # prompt positions per block
K_BLOCK = 256  # pair rows per k block
LOW_HALF_SHIFT = 16
HIGH_HALF_MASK = 0xFFFF0000


def pair_matmul(in_features: int, out_features: int, tile: int, x_dtype: str, bias: bool = False,
                residual: bool = False):
    """The kernel for one weight in column pairs of `tile` columns: (x, weight[, bias [N] float32[, residual
    [1, n, N] float32]]) -> y."""
    if residual and not bias:
        raise ValueError("a residual comes with a bias (the fused block's W_out)")
    K, N = in_features, out_features
    if K % 2 or N % tile:
        raise ValueError(f"a {K} x {N} weight does not pair in tiles of {tile} columns")
    tiles, pair_rows = N // tile, K // 2
    k_block = next(b for b in (K_BLOCK, 128, 64, 32, 16, 8, 4, 2, 1) if pair_rows % b == 0)
    k_blocks = pair_rows // k_block
    lanes = min(LANES, tile)
    vec, word_vec = f"float32x{lanes}", f"uint32x{lanes}"
    ahead = WEIGHT_PREFETCH_BYTES // (tile * 4)  # pair rows

    @T.macro
    def positions(x, words, y, bias, residual, tile_i, kb, t0, count, streams):
        """y[t0 .. t0 + count, the tile's columns] += this k block's share (the first block starts from 0);
        the last block adds the bias and the residual."""
        acc = T.sblock_alloc_buffer((count * tile,), "float32", scope="local")
        if kb == 0:
            for c in T.vectorized(count * tile):
                acc[c] = T.float32(0)
        else:
            for i, c in T.grid(count, tile):
                acc[i * tile + c] = y[0, t0 + i, tile_i * tile + c]
        for r in range(k_block):
            for v in T.unroll(tile // lanes):
                if streams:
                    prefetch(words[tile_i, kb * k_block + r + ahead, v * lanes], WEIGHT_PREFETCH_LOCALITY)
                for i in T.unroll(count):
                    # no Python names for vector values (TVMScript would give each a buffer): LLVM shares the
                    # load and the widening between the positions
                    acc[T.ramp(i * tile + v * lanes, 1, lanes)] = acc.vload([i * tile + v * lanes], vec) + (
                        T.Broadcast(T.Cast("float32", x[0, t0 + i, 2 * (kb * k_block + r)]), lanes)
                        * T.reinterpret(T.shift_left(words.vload([tile_i, kb * k_block + r, v * lanes], word_vec),
                                                     T.Broadcast(T.uint32(LOW_HALF_SHIFT), lanes)), dtype=vec))
                    acc[T.ramp(i * tile + v * lanes, 1, lanes)] = acc.vload([i * tile + v * lanes], vec) + (
                        T.Broadcast(T.Cast("float32", x[0, t0 + i, 2 * (kb * k_block + r) + 1]), lanes)
                        * T.reinterpret(T.bitwise_and(words.vload([tile_i, kb * k_block + r, v * lanes], word_vec),
                                                      T.Broadcast(T.uint32(HIGH_HALF_MASK), lanes)), dtype=vec))
        if bias is None:  # decided as the kernel is written (a Python condition), like residual's below
            for i, c in T.grid(count, tile):
                y[0, t0 + i, tile_i * tile + c] = acc[i * tile + c]
        elif kb < k_blocks - 1:
            for i, c in T.grid(count, tile):
                y[0, t0 + i, tile_i * tile + c] = acc[i * tile + c]
        elif residual is None:
            for i, c in T.grid(count, tile):
                y[0, t0 + i, tile_i * tile + c] = acc[i * tile + c] + bias[tile_i * tile + c]
        else:  # the order of the graph's own adds: (x W + b) + h
            for i, c in T.grid(count, tile):
                y[0, t0 + i, tile_i * tile + c] = (acc[i * tile + c] + bias[tile_i * tile + c]) + residual[
                    0, t0 + i, tile_i * tile + c]

    @T.macro
    def gemm(x, weight, y, bias, residual, n):
        words = T.decl_buffer((tiles, pair_rows, tile), "uint32", data=weight.data)
        for tile_i in T.parallel(tiles):
            for kb in range(k_blocks):
                for tb in range(n // ROWS):
                    with T.sblock("pair_matmul"):
                        T.reads(x[0, tb * ROWS:tb * ROWS + ROWS, 0:K], weight[tile_i, 0:pair_rows, 0:tile, 0:2],
                                y[0, tb * ROWS:tb * ROWS + ROWS, tile_i * tile:tile_i * tile + tile])
                        T.writes(y[0, tb * ROWS:tb * ROWS + ROWS, tile_i * tile:tile_i * tile + tile])
                        positions(x, words, y, bias, residual, tile_i, kb, tb * ROWS, ROWS, tb == 0)
                for t in range(n % ROWS):
                    with T.sblock("pair_matmul_rest"):
                        T.reads(x[0, n - n % ROWS + t, 0:K], weight[tile_i, 0:pair_rows, 0:tile, 0:2],
                                y[0, n - n % ROWS + t, tile_i * tile:tile_i * tile + tile])
                        T.writes(y[0, n - n % ROWS + t, tile_i * tile:tile_i * tile + tile])
                        positions(x, words, y, bias, residual, tile_i, kb, n - n % ROWS + t, 1, n < ROWS and t == 0)

    # one entry per signature (TVMScript has no optional parameters); the body is gemm's
    if residual:
        @T.prim_func(private=True, s_tir=True)
        def with_residual(var_x: T.handle, weight: T.Buffer((tiles, pair_rows, tile, 2), "bfloat16"),
                          bias: T.Buffer((N,), "float32"), var_residual: T.handle, var_y: T.handle):
            T.func_attr(HAND_SCHEDULED)
            n = T.int64()
            x = T.match_buffer(var_x, (1, n, K), x_dtype)
            residual_ = T.match_buffer(var_residual, (1, n, N), "float32")
            y = T.match_buffer(var_y, (1, n, N), "float32")
            gemm(x, weight, y, bias, residual_, n)

        return with_residual
    if bias:
        @T.prim_func(private=True, s_tir=True)
        def with_bias(var_x: T.handle, weight: T.Buffer((tiles, pair_rows, tile, 2), "bfloat16"),
                      bias: T.Buffer((N,), "float32"), var_y: T.handle):
            T.func_attr(HAND_SCHEDULED)
            n = T.int64()
            x = T.match_buffer(var_x, (1, n, K), x_dtype)
            y = T.match_buffer(var_y, (1, n, N), "float32")
            gemm(x, weight, y, bias, None, n)

        return with_bias

    @T.prim_func(private=True, s_tir=True)
    def plain(var_x: T.handle, weight: T.Buffer((tiles, pair_rows, tile, 2), "bfloat16"), var_y: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), x_dtype)
        y = T.match_buffer(var_y, (1, n, N), "float32")
        gemm(x, weight, y, None, None, n)

    return plain
