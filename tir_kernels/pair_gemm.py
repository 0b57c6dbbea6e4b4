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

import functools

from tvm.script import tirx as T

from .common import HAND_SCHEDULED, WEIGHT_PREFETCH_BYTES, WEIGHT_PREFETCH_LOCALITY, prefetch

LANES = 16  # float32 lanes of a 512-bit register
ROWS = 4  # prompt positions per block (the kernel writes out its blocks of 1 to 3 for the rest)
# With 256-bit registers (lanes 8: AVX2 CPUs) a block of ROWS positions over the whole tile needs 32 of the 16 ymm
# registers: prompt blocks there take NARROW_VECTORS 8-column vectors of the tile at a time (8 accumulators: each
# takes two dependent FMAs a pair row, so 4 of them left the FMA units waiting on latency), each slice of the k
# block staying in L1 while every block passes over it.
NARROW_VECTORS = 2
K_BLOCK = 256  # pair rows per k block
LOW_HALF_SHIFT = 16
HIGH_HALF_MASK = 0xFFFF0000

# AVX512_BF16's vdpbf16ps: y[c] += x[2r + 1] w[2r + 1, c], then += x[2r] w[2r, c], for 16 (or 8) columns of a
# pair row in one instruction, which reads the column-pair layout as it is stored. LLVM types its operands
# <32 x bfloat>, which TVM's bfloat16 legalization never leaves in a kernel, so a small LLVM function takes
# the 32-bit words and bitcasts them; the kernel imports it (pragma_import_llvm) and LLVM inlines it.
DOT_FUNCTIONS = {16: "gptj_dpbf16ps_512", 8: "gptj_dpbf16ps_256"}
DOT_LLVM = "".join(f"""
define linkonce_odr <{lanes} x float> @{name}(<{lanes} x float> %acc, <{lanes} x i32> %w, <{lanes} x i32> %x)
    alwaysinline {{
  %wb = bitcast <{lanes} x i32> %w to <{2 * lanes} x bfloat>
  %xb = bitcast <{lanes} x i32> %x to <{2 * lanes} x bfloat>
  %y = call <{lanes} x float> @llvm.x86.avx512bf16.dpbf16ps.{32 * lanes}(
      <{lanes} x float> %acc, <{2 * lanes} x bfloat> %wb, <{2 * lanes} x bfloat> %xb)
  ret <{lanes} x float> %y
}}
declare <{lanes} x float> @llvm.x86.avx512bf16.dpbf16ps.{32 * lanes}(<{lanes} x float>, <{2 * lanes} x bfloat>,
                                                                  <{2 * lanes} x bfloat>)
""" for lanes, name in DOT_FUNCTIONS.items())


@functools.cache  # the frontend asks once per call site; writing the TVMScript takes up to a second
def pair_matmul(in_features: int, out_features: int, tile: int, x_dtype: str, bias: bool = False,
                residual: bool = False, dot: bool = False, lanes: int = LANES):
    """The kernel for one weight in column pairs of `tile` columns: (x, weight[, bias [N] float32[, residual
    [1, n, N] float32]]) -> y. `dot`: on vdpbf16ps (CPUs with AVX512_BF16; bfloat16 x only), else widened
    to float32 with a shift and a mask and two FMAs. `lanes`: float32 lanes of the target's vector registers
    (16, or 8 for 256-bit ones)."""
    if residual and not bias:
        raise ValueError("a residual comes with a bias (the fused block's W_out)")
    K, N = in_features, out_features
    if K % 2 or N % tile:
        raise ValueError(f"a {K} x {N} weight does not pair in tiles of {tile} columns")
    tiles, pair_rows = N // tile, K // 2
    k_block = next(b for b in (K_BLOCK, 128, 64, 32, 16, 8, 4, 2, 1) if pair_rows % b == 0)
    k_blocks = pair_rows // k_block
    narrow = lanes < LANES  # 256-bit registers: prompt blocks one vector of the tile at a time
    lanes = min(lanes, tile)
    vec, word_vec = f"float32x{lanes}", f"uint32x{lanes}"
    if dot and x_dtype != "bfloat16":
        raise ValueError(f"vdpbf16ps multiplies bfloat16 by bfloat16, not {x_dtype} x")
    ahead = WEIGHT_PREFETCH_BYTES // (tile * 4)  # pair rows

    # With 256-bit registers a bfloat16 x pair is widened in vector registers from its 32-bit word, as the
    # weights are: casting each bfloat16 to float32 took four scalar instructions and a broadcast, per
    # vector pass, more than the two FMAs it feeds
    widen_x_words = narrow and x_dtype == "bfloat16"

    def x_half(x, x_words, t, r, high):
        """x[t, 2r + high] as float32 in every lane."""
        if not widen_x_words:
            return T.Broadcast(T.Cast("float32", x[0, t, 2 * r + high]), lanes)
        word = T.Broadcast(x_words[0, t, r], lanes)
        if high:
            return T.reinterpret(T.bitwise_and(word, T.Broadcast(T.uint32(HIGH_HALF_MASK), lanes)), dtype=vec)
        return T.reinterpret(T.shift_left(word, T.Broadcast(T.uint32(LOW_HALF_SHIFT), lanes)), dtype=vec)

    @T.macro
    def positions(x, x_words, words, y, bias, residual, tile_i, kb, t0, count, v0, vectors, streams):
        """y[t0 .. t0 + count, the tile's vectors v0 .. v0 + vectors of `lanes` columns] += this k block's share
        (the first block starts from 0); the last block adds the bias and the residual."""
        # (no Python names for values here: TVMScript would bind each to a variable or a buffer)
        acc = T.sblock_alloc_buffer((count * vectors * lanes,), "float32", scope="local")
        if kb == 0:
            for c in T.vectorized(count * vectors * lanes):
                acc[c] = T.float32(0)
        else:  # whole vectors at constant offsets, so that LLVM keeps acc in registers (not on the stack)
            for i in T.unroll(count):
                for v in T.unroll(vectors):
                    acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = y.vload(
                        [0, t0 + i, tile_i * tile + (v0 + v) * lanes], vec)
        for r in range(k_block):
            for v in T.unroll(vectors):
                if streams:
                    prefetch(words[tile_i, kb * k_block + r + ahead, (v0 + v) * lanes], WEIGHT_PREFETCH_LOCALITY)
                for i in T.unroll(count):
                    # no Python names for vector values (TVMScript would give each a buffer): LLVM shares the
                    # load and the widening between the positions
                    if dot:
                        acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = T.call_pure_extern(
                            vec, DOT_FUNCTIONS[lanes], acc.vload([(i * vectors + v) * lanes], vec),
                            words.vload([tile_i, kb * k_block + r, (v0 + v) * lanes], word_vec),
                            T.Broadcast(x_words[0, t0 + i, kb * k_block + r], lanes))
                    else:
                        acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = acc.vload(
                            [(i * vectors + v) * lanes], vec) + (
                            x_half(x, x_words, t0 + i, kb * k_block + r, 0)
                            * T.reinterpret(T.shift_left(
                                words.vload([tile_i, kb * k_block + r, (v0 + v) * lanes], word_vec),
                                T.Broadcast(T.uint32(LOW_HALF_SHIFT), lanes)), dtype=vec))
                        acc[T.ramp((i * vectors + v) * lanes, 1, lanes)] = acc.vload(
                            [(i * vectors + v) * lanes], vec) + (
                            x_half(x, x_words, t0 + i, kb * k_block + r, 1)
                            * T.reinterpret(T.bitwise_and(
                                words.vload([tile_i, kb * k_block + r, (v0 + v) * lanes], word_vec),
                                T.Broadcast(T.uint32(HIGH_HALF_MASK), lanes)), dtype=vec))
        # written back as whole vectors at constant offsets too
        for i in T.unroll(count):
            for v in T.unroll(vectors):
                if bias is None:  # decided as the kernel is written (a Python condition), like residual's below
                    y[0, t0 + i, T.ramp(tile_i * tile + (v0 + v) * lanes, 1, lanes)] = acc.vload(
                        [(i * vectors + v) * lanes], vec)
                elif kb < k_blocks - 1:
                    y[0, t0 + i, T.ramp(tile_i * tile + (v0 + v) * lanes, 1, lanes)] = acc.vload(
                        [(i * vectors + v) * lanes], vec)
                elif residual is None:
                    y[0, t0 + i, T.ramp(tile_i * tile + (v0 + v) * lanes, 1, lanes)] = acc.vload(
                        [(i * vectors + v) * lanes], vec) + bias.vload([tile_i * tile + (v0 + v) * lanes], vec)
                else:  # the order of the graph's own adds: (x W + b) + h
                    y[0, t0 + i, T.ramp(tile_i * tile + (v0 + v) * lanes, 1, lanes)] = (acc.vload(
                        [(i * vectors + v) * lanes], vec) + bias.vload([tile_i * tile + (v0 + v) * lanes], vec)) + \
                        residual.vload([0, t0 + i, tile_i * tile + (v0 + v) * lanes], vec)

    @T.macro
    def rows(name, x, x_words, words, weight, y, bias, residual, tile_i, kb, t0, count, streams, v0=0,
             vectors=tile // lanes):
        with T.sblock(name):
            T.reads(x[0, t0:t0 + count, 0:K], weight[tile_i, 0:pair_rows, 0:tile, 0:2],
                    y[0, t0:t0 + count, tile_i * tile:tile_i * tile + tile])
            T.writes(y[0, t0:t0 + count, tile_i * tile:tile_i * tile + tile])
            positions(x, x_words, words, y, bias, residual, tile_i, kb, t0, count, v0, vectors, streams)

    # vectors of the tile a narrow prompt block takes at a time (one where the tile has an odd number)
    slice_vectors = NARROW_VECTORS if (tile // lanes) % NARROW_VECTORS == 0 else 1

    @T.macro
    def narrow_rows(x, x_words, words, weight, y, bias, residual, tile_i, kb, n):
        """A prompt's rows with 256-bit registers: per slice of the tile's vectors, blocks of ROWS and the rest."""
        for s in range(tile // lanes // slice_vectors):
            rows("pair_matmul_first", x, x_words, words, weight, y, bias, residual, tile_i, kb, 0, ROWS, True,
                 s * slice_vectors, slice_vectors)
            for tb in range(1, n // ROWS):
                rows("pair_matmul", x, x_words, words, weight, y, bias, residual, tile_i, kb, tb * ROWS, ROWS,
                     False, s * slice_vectors, slice_vectors)
            if n % ROWS >= 2:
                rows("pair_matmul_rest2", x, x_words, words, weight, y, bias, residual, tile_i, kb,
                     n // ROWS * ROWS, 2, False, s * slice_vectors, slice_vectors)
            if n % 2 == 1:
                rows("pair_matmul_rest1", x, x_words, words, weight, y, bias, residual, tile_i, kb, n - 1, 1,
                     False, s * slice_vectors, slice_vectors)

    @T.macro
    def all_tiles(x, x_words, words, weight, y, bias, residual, n):
        # The first position block streams the tile in (it prefetches), the others find it in L2. Whether a
        # block streams is decided as the kernel is written, so no branch sits in the inner loop (one there kept
        # the accumulators on the stack).
        for tile_i in T.parallel(tiles):
            for kb in range(k_blocks):
                if narrow and n >= ROWS:
                    narrow_rows(x, x_words, words, weight, y, bias, residual, tile_i, kb, n)
                elif n >= ROWS:
                    rows("pair_matmul_first", x, x_words, words, weight, y, bias, residual, tile_i, kb, 0, ROWS, True)
                    for tb in range(1, n // ROWS):
                        rows("pair_matmul", x, x_words, words, weight, y, bias, residual, tile_i, kb, tb * ROWS,
                             ROWS, False)
                    # the rest as one block of its size (ROWS is 4)
                    if n % ROWS == 3:
                        rows("pair_matmul_rest3", x, x_words, words, weight, y, bias, residual, tile_i, kb, n - 3,
                             3, False)
                    elif n % ROWS == 2:
                        rows("pair_matmul_rest2", x, x_words, words, weight, y, bias, residual, tile_i, kb, n - 2,
                             2, False)
                    elif n % ROWS == 1:
                        rows("pair_matmul_rest1", x, x_words, words, weight, y, bias, residual, tile_i, kb, n - 1,
                             1, False)
                elif n == 3:
                    rows("pair_matmul_three", x, x_words, words, weight, y, bias, residual, tile_i, kb, 0, 3, True)
                elif n == 2:
                    rows("pair_matmul_two", x, x_words, words, weight, y, bias, residual, tile_i, kb, 0, 2, True)
                elif n == 1:  # and no rows at all (a serving step whose rows all belong to unfinished prompts)
                    rows("pair_matmul_one", x, x_words, words, weight, y, bias, residual, tile_i, kb, 0, 1, True)

    @T.macro
    def gemm(x, weight, y, bias, residual, n):
        words = T.decl_buffer((tiles, pair_rows, tile), "uint32", data=weight.data)
        if dot:  # x's bfloat16 pairs as 32-bit words, and the LLVM function the dot products call
            x_words = T.decl_buffer((1, n, pair_rows), "uint32", data=x.data)
            with T.attr(0, "pragma_import_llvm", DOT_LLVM):
                all_tiles(x, x_words, words, weight, y, bias, residual, n)
        elif widen_x_words:
            all_tiles(x, T.decl_buffer((1, n, pair_rows), "uint32", data=x.data), words, weight, y, bias, residual, n)
        else:
            all_tiles(x, None, words, weight, y, bias, residual, n)

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
