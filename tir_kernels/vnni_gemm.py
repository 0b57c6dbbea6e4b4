"""The q8/q4 GEMM on AVX-512 VNNI integer dot products (x86 CPUs with avx512_vnni), written in TIR.

One task per column tile of TILE outputs (a contiguous run of the weight file), in one of two shapes:
- a serving step of STEP_MIN to PROMPT_MIN - 1 rows (a few streams' decode rows): one 16-column lane of the tile
  at a time, in blocks of STEP_ROWS rows (8 dot products and 8 accumulators in registers), so each weight vector
  is loaded and unpacked once for 8 rows, and K in chunks of CHUNK_GROUPS groups (the sum goes on in y), so the
  rows' inputs stay in L1 while the tile's four lanes take their turns;
- a prompt, and decode's 1 to 3 rows: the tile's four lanes at once, in blocks of PROMPT_ROWS rows. The
  lane-at-a-time shape ran prompts 10-30% slower (W_out's 20480 inputs most), each row's input broadcast once
  per lane instead of once, and decode 10-20% slower, reading a quarter of each 256-byte row per pass.

vnni_matmul:
y[t, c] = sum over groups g of  w_scale[g, c] * x_scale[t, g] * (sum over the group's k of x_q[t, k] * q[k, c])
x is quantized per group of GROUP features to int8 (quantize_activations, frontend/layouts/quantized.py:
x_scale = max |x| / 127, x_q = round(x / x_scale), x_sum = sum of x_q); the weights are stored unsigned
(q + OFFSET) four input features per 32-bit lane, so `vpdpbusd` multiplies 64 weight bytes by 4 broadcast x_q
bytes and sums each lane's four products: one instruction per 64 weight bytes, where widening every weight to
float takes 12 and leaves the GEMV compute bound. The offset comes back out per group: sum x_q (q + OFFSET) -
OFFSET * x_sum = sum x_q q (a serving step's dot product starts from -OFFSET * x_sum). q4 unpacks two nibbles
per byte (low: features 8i..8i+3, high: 8i+4..8i+7) with an AND and a shift. Both shapes add the same float32
terms in the same order, so a row's result does not depend on the shape or block it ran in.
A tile's first row block asks for each weight line WEIGHT_PREFETCH_BYTES further on (into L2, running on into the
next tile, which is the next one a thread streams), as the bfloat16 GEMVs do (schedules/prefetch.py): the
hardware prefetchers alone leave these GEMVs short of the read bandwidth (README, "Weight prefetch"). The later
blocks find the weights in L2 (prefetching again there slowed q8's prompt GEMMs by a third). A serving step's
first block asks for its lane's line one chunk further on instead: the lane comes back to that chunk after the
tile's other lanes, and half a chunk ahead (WEIGHT_PREFETCH_BYTES) left each pass's first half-chunk to the
hardware (q8's 4-16-row GEMMs 2-12% slower; q4's chunk is the same 16 KiB).
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from .common import HAND_SCHEDULED, WEIGHT_PREFETCH_BYTES, WEIGHT_PREFETCH_LOCALITY, fold_lanes, prefetch

LANES = 16  # 32-bit lanes of a 512-bit register: 16 columns x 4 input features = 64 weight bytes
STEP_ROWS = 8  # a serving step's rows per pass over a lane: 8 x (dot + acc) of the 32 AVX-512 registers
PROMPT_ROWS = 3  # a prompt's rows per weight load: 3 x (4 dot + 4 acc)
PROMPT_MIN = 32  # rows from which the prompt shape runs again
STEP_MIN = 4  # rows from which the serving-step shape runs: 1-3 rows (decode) read the weights faster a tile at a time
CHUNK_GROUPS = 16  # a serving step's groups of K per pass
assert STEP_ROWS == 8 and PROMPT_ROWS == 3, "the kernel writes the blocks' remainders out"
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
# In a serving step, a group's dot product (an integer of magnitude below 2^22: 32 x 127 x 128 at most) is
# counted up from the bits of MAGIC = 1.5 x 2^23, so it lands on the bits of the float MAGIC + dot (exactly), and
# one float subtraction gives the dot product; the offset's correction rides in the starting value. (Neither
# vcvtdq2ps nor the subtraction shares vpdpbusd's pipes on AMD Zen 4: measured, benchmarks/prefill.py's group
# ceiling.) In prompts it ran q4 1-8% slower than the conversion.
MAGIC = 12582912.0
MAGIC_BITS = 0x4B400000


@functools.cache  # the frontend asks once per call site; writing the TVMScript takes up to a second
def vnni_matmul(in_features: int, out_features: int, scheme: str, group: int, tile: int, offset: int,
                bias: bool = False, residual: bool = False):
    """(x_q [1, n, K] int8, x_scale [1, n, K / GROUP] f32, x_sum [1, n, K / GROUP] i32, weight, w_scale
    [N / TILE, K / GROUP, TILE] f16[, bias [N] float32[, residual [1, n, N] float32]]) -> y [1, n, N] float32,
    for levels stored as frontend/layouts/quantized.py says: `scheme` q8 or q4, groups of `group` input features,
    column tiles of `tile`, levels + `offset`; (y + bias) + residual as y is written, where asked for."""
    if residual and not bias:
        raise ValueError("a residual comes with a bias (the fused block's W_out)")
    if group * 127 * 128 >= 2 ** 22:
        raise ValueError(f"groups of {group} can overflow the dot products' float bits (MAGIC)")
    GROUP, TILE = group, tile  # the kernel's constants, named as in its math
    K, N, G = in_features, out_features, in_features // GROUP
    tiles, tile_lanes = N // TILE, TILE // LANES
    q4 = scheme == "q4"
    rows = K // 8 if q4 else K // 4
    group_rows = GROUP // 8 if q4 else GROUP // 4  # rows of the stored levels per group
    ahead = WEIGHT_PREFETCH_BYTES // (TILE * 4)  # rows of the stored levels
    chunks = (G + CHUNK_GROUPS - 1) // CHUNK_GROUPS
    chunk_rows = CHUNK_GROUPS * group_rows

    def group_dot(xq, xsum, weight, tile, g, lane, t):
        """The group's integer dot product of row t with the lane's 16 columns, counted up from MAGIC_BITS, as
        one expression (LLVM keeps it in a register; a buffer would live in TVM's heap workspace)."""
        dot = T.Broadcast(xsum[0, t, g] * (-offset) + MAGIC_BITS, LANES)
        for step in range(group_rows):
            row, k = g * group_rows + step, g * GROUP + step * (8 if q4 else 4)
            if q4:
                dot = _vpdpbusd(_vpdpbusd(dot, _nibbles(weight, tile, row, lane, 0), xq, t, k),
                                _nibbles(weight, tile, row, lane, 4), xq, t, k + 4)
            else:
                dot = _vpdpbusd(dot, weight.vload([tile, row, lane * LANES, 0], "uint8x64"), xq, t, k)
        return dot

    def group_term(dot, w_scale, xs, tile, g, lane, t):
        """The group's float32 term of y[t, the lane's columns]: dot * (w_scale * x_scale)."""
        return (T.reinterpret("float32x16", dot) - T.Broadcast(T.float32(MAGIC), LANES)) * (
            T.Cast("float32x16", w_scale.vload([tile, g, lane * LANES], "float16x16"))
            * T.Broadcast(xs[0, t, g], LANES))

    store = store_macro(LANES)

    @T.macro
    def lane_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, t0, count, streams):
        """y[t0 .. t0 + count, the lane's 16 columns of the tile], over the groups of K chunk `chunk`: one pass
        over the lane's weights there; the sum goes on from what the chunk before left in y."""
        acc = T.sblock_alloc_buffer((count * LANES,), "float32", scope="local")
        col = tile * TILE + lane * LANES
        for i in T.unroll(count):
            if chunk == 0:
                for c in T.vectorized(LANES):
                    acc[i * LANES + c] = T.float32(0)
            else:
                for c in T.vectorized(LANES):
                    acc[i * LANES + c] = y[0, t0 + i, col + c]
        for g in range(chunk * CHUNK_GROUPS, T.min(chunk * CHUNK_GROUPS + CHUNK_GROUPS, G)):
            if streams:
                # one chunk on: the lane's next turn. Past the tile's last row the address is in the next tile
                # (or past the weights, which is harmless: prefetches never fault). With a prefetch in the loop
                # LLVM stores the accumulators after every group (TVM gives acc a heap workspace, which a
                # prefetch might touch)
                for step in T.unroll(group_rows):
                    prefetch(weight[tile, g * group_rows + step + chunk_rows, lane * LANES, 0],
                             WEIGHT_PREFETCH_LOCALITY)
            for i in T.unroll(count):
                # no Python names for vector values: TVMScript would give each a buffer (LLVM shares the weight
                # loads and the unpacking between the rows)
                acc[T.ramp(i * LANES, 1, LANES)] = acc.vload([i * LANES], "float32x16") + group_term(
                    group_dot(xq, xsum, weight, tile, g, lane, t0 + i), w_scale, xs, tile, g, lane, t0 + i)
        for i in T.unroll(count):
            store(y, bias, residual, t0 + i, col, acc, i * LANES, chunk < chunks - 1)

    @T.macro
    def tile_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, t0, count, streams):
        """y[t0 .. t0 + count, the tile's columns]: each weight load (and q4's unpacking) serves `count` rows.
        Whole vectors at constant offsets, so that LLVM keeps acc and dot in registers."""
        acc = T.sblock_alloc_buffer((count * TILE,), "float32", scope="local")
        dot = T.sblock_alloc_buffer((count * TILE,), "int32", scope="local")
        for c in T.vectorized(count * TILE):
            acc[c] = T.float32(0)
        for g in range(G):
            for c in T.vectorized(count * TILE):
                dot[c] = 0
            for step in T.unroll(group_rows):
                for lane in T.unroll(tile_lanes):
                    if streams:
                        prefetch(weight[tile, g * group_rows + step + ahead, lane * LANES, 0],
                                 WEIGHT_PREFETCH_LOCALITY)
                    for i in T.unroll(count):
                        if q4:
                            dot[T.ramp(i * TILE + lane * LANES, 1, LANES)] = _vpdpbusd(
                                _vpdpbusd(dot.vload([i * TILE + lane * LANES], "int32x16"),
                                          _nibbles(weight, tile, g * group_rows + step, lane, 0),
                                          xq, t0 + i, g * GROUP + step * 8),
                                _nibbles(weight, tile, g * group_rows + step, lane, 4),
                                xq, t0 + i, g * GROUP + step * 8 + 4)
                        else:
                            dot[T.ramp(i * TILE + lane * LANES, 1, LANES)] = _vpdpbusd(
                                dot.vload([i * TILE + lane * LANES], "int32x16"),
                                weight.vload([tile, g * group_rows + step, lane * LANES, 0], "uint8x64"),
                                xq, t0 + i, g * GROUP + step * 4)
            # (here MAGIC's float subtraction ran q4 prompts 1-8% slower than the conversion)
            for i in T.unroll(count):
                for c in T.vectorized(TILE):
                    acc[i * TILE + c] = acc[i * TILE + c] + T.Cast(
                        "float32", dot[i * TILE + c] - offset * xsum[0, t0 + i, g]) * (
                        T.Cast("float32", w_scale[tile, g, c]) * xs[0, t0 + i, g])
        for i in T.unroll(count):
            for lane in T.unroll(tile_lanes):
                store(y, bias, residual, t0 + i, tile * TILE + lane * LANES, acc, i * TILE + lane * LANES, False)

    @T.macro
    def lane_block(name, xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, t0, count, streams):
        with T.sblock(name):
            T.reads(xq[0, t0:t0 + count, 0:K], xs[0, t0:t0 + count, 0:G], xsum[0, t0:t0 + count, 0:G],
                    weight[tile, 0:rows, 0:TILE, 0:4], w_scale[tile, 0:G, 0:TILE],
                    y[0, t0:t0 + count, tile * TILE:tile * TILE + TILE])
            T.writes(y[0, t0:t0 + count, tile * TILE:tile * TILE + TILE])
            lane_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, t0, count, streams)

    @T.macro
    def tile_block(name, xq, xs, xsum, weight, w_scale, y, bias, residual, tile, t0, count, streams):
        with T.sblock(name):
            T.reads(xq[0, t0:t0 + count, 0:K], xs[0, t0:t0 + count, 0:G], xsum[0, t0:t0 + count, 0:G],
                    weight[tile, 0:rows, 0:TILE, 0:4], w_scale[tile, 0:G, 0:TILE])
            T.writes(y[0, t0:t0 + count, tile * TILE:tile * TILE + TILE])
            tile_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, t0, count, streams)

    @T.macro
    def step_rest(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, t0, n_rest, streams):
        """A serving step's n_rest (< STEP_ROWS) rows from t0, as blocks of 4, 2 and 1 rows."""
        if n_rest >= 4:
            lane_block("vnni_matmul_4", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, t0, 4,
                       streams)
        if n_rest % 4 >= 2:
            lane_block("vnni_matmul_2", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk,
                       t0 + n_rest // 4 * 4, 2, streams)
        if n_rest % 2 == 1:
            lane_block("vnni_matmul_1", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk,
                       t0 + n_rest - 1, 1, streams)

    @T.macro
    def gemm(xq, xs, xsum, weight, w_scale, y, bias, residual, n):
        # whether a block prefetches is decided as the kernel is written, so no branch sits in the inner loop
        for tile in T.parallel(tiles):
            if n >= PROMPT_MIN or n < STEP_MIN:
                if n >= PROMPT_ROWS:
                    tile_block("vnni_matmul_prompt_first", xq, xs, xsum, weight, w_scale, y, bias, residual, tile,
                               0, PROMPT_ROWS, True)
                    for b in range(1, n // PROMPT_ROWS):
                        tile_block("vnni_matmul_prompt", xq, xs, xsum, weight, w_scale, y, bias, residual, tile,
                                   b * PROMPT_ROWS, PROMPT_ROWS, False)
                    if n % PROMPT_ROWS == 2:
                        tile_block("vnni_matmul_prompt_rest2", xq, xs, xsum, weight, w_scale, y, bias, residual,
                                   tile, n - 2, 2, False)
                    elif n % PROMPT_ROWS == 1:
                        tile_block("vnni_matmul_prompt_rest1", xq, xs, xsum, weight, w_scale, y, bias, residual,
                                   tile, n - 1, 1, False)
                elif n == 2:
                    tile_block("vnni_matmul_two", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, 0, 2, True)
                elif n == 1:  # and no rows at all (a serving step whose rows all belong to unfinished prompts)
                    tile_block("vnni_matmul_one", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, 0, 1, True)
            else:  # a serving step's rows
                for chunk in range(chunks):
                    for lane in range(tile_lanes):
                        if n >= STEP_ROWS:
                            # 8 rows of q4 take longer to multiply than to read: the prefetches cost more (their
                            # accumulator stores, see lane_rows) than they bring
                            lane_block("vnni_matmul_step_first", xq, xs, xsum, weight, w_scale, y, bias, residual,
                                       tile, lane, chunk, 0, STEP_ROWS, not q4)
                            for b in range(1, n // STEP_ROWS):
                                lane_block("vnni_matmul_step", xq, xs, xsum, weight, w_scale, y, bias, residual,
                                           tile, lane, chunk, b * STEP_ROWS, STEP_ROWS, False)
                            step_rest(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk,
                                      n // STEP_ROWS * STEP_ROWS, n % STEP_ROWS, False)
                        else:
                            step_rest(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, lane, chunk, 0, n,
                                      True)

    return entry_points(gemm, K, N, G, tiles, rows, TILE, bias, residual)


def store_macro(lanes: int):
    """The int8 GEMMs' write of `lanes` columns of y: store(y, bias, residual, t, col, acc, a0, partial) sets
    y[t, col .. col + lanes] = acc[a0 ..], + bias, + residual unless `partial` (a chunk of K before the last)."""

    @T.macro
    def store(y, bias, residual, t, col, acc, a0, partial):
        if bias is None:  # decided as the kernel is written (a Python condition)
            for c in T.vectorized(lanes):
                y[0, t, col + c] = acc[a0 + c]
        elif partial:
            for c in T.vectorized(lanes):
                y[0, t, col + c] = acc[a0 + c]
        elif residual is None:
            for c in T.vectorized(lanes):
                y[0, t, col + c] = acc[a0 + c] + bias[col + c]
        else:  # the order of the graph's own adds: (x W + b) + h
            for c in T.vectorized(lanes):
                y[0, t, col + c] = (acc[a0 + c] + bias[col + c]) + residual[0, t, col + c]

    return store


def entry_points(gemm, K: int, N: int, G: int, tiles: int, rows: int, TILE: int, bias: bool, residual: bool):
    """The int8 GEMMs' prim_func for their signature, with `gemm(xq, xs, xsum, weight, w_scale, y, bias,
    residual, n)` as its body: one entry per signature, since TVMScript has no optional parameters."""
    if residual:
        @T.prim_func(private=True, s_tir=True)
        def with_residual(var_xq: T.handle, var_xs: T.handle, var_xsum: T.handle,
                          weight: T.Buffer((tiles, rows, TILE, 4), "uint8"),
                          w_scale: T.Buffer((tiles, G, TILE), "float16"), bias: T.Buffer((N,), "float32"),
                          var_residual: T.handle, var_y: T.handle):
            T.func_attr(HAND_SCHEDULED)
            n = T.int64()
            xq = T.match_buffer(var_xq, (1, n, K), "int8")
            xs = T.match_buffer(var_xs, (1, n, G), "float32")
            xsum = T.match_buffer(var_xsum, (1, n, G), "int32")
            residual_ = T.match_buffer(var_residual, (1, n, N), "float32")
            y = T.match_buffer(var_y, (1, n, N), "float32")
            gemm(xq, xs, xsum, weight, w_scale, y, bias, residual_, n)

        return with_residual
    if bias:
        @T.prim_func(private=True, s_tir=True)
        def with_bias(var_xq: T.handle, var_xs: T.handle, var_xsum: T.handle,
                      weight: T.Buffer((tiles, rows, TILE, 4), "uint8"),
                      w_scale: T.Buffer((tiles, G, TILE), "float16"), bias: T.Buffer((N,), "float32"),
                      var_y: T.handle):
            T.func_attr(HAND_SCHEDULED)
            n = T.int64()
            xq = T.match_buffer(var_xq, (1, n, K), "int8")
            xs = T.match_buffer(var_xs, (1, n, G), "float32")
            xsum = T.match_buffer(var_xsum, (1, n, G), "int32")
            y = T.match_buffer(var_y, (1, n, N), "float32")
            gemm(xq, xs, xsum, weight, w_scale, y, bias, None, n)

        return with_bias

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_xq: T.handle, var_xs: T.handle, var_xsum: T.handle,
               weight: T.Buffer((tiles, rows, TILE, 4), "uint8"), w_scale: T.Buffer((tiles, G, TILE), "float16"),
               var_y: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        xq = T.match_buffer(var_xq, (1, n, K), "int8")
        xs = T.match_buffer(var_xs, (1, n, G), "float32")
        xsum = T.match_buffer(var_xsum, (1, n, G), "int32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        gemm(xq, xs, xsum, weight, w_scale, y, None, None, n)

    return kernel


def _nibbles(weight, tile, row, lane, shift):
    """64 bytes of q4 levels: the low (shift 0) or high (shift 4) nibbles, as unsigned bytes."""
    packed = weight.vload([tile, row, lane * LANES, 0], "uint8x64")
    if shift:
        packed = T.shift_right(packed, T.Broadcast(T.uint8(shift), 64))
    return T.bitwise_and(packed, T.Broadcast(T.uint8(15), 64))


def _vpdpbusd(acc, weights_u8x64, xq, t, k):
    """acc[i] += sum over j < 4 of weights[4i + j] (unsigned) * xq[t, k + j] (signed), i < 16."""
    x_quad = T.reinterpret(xq.vload([0, t, k], "int8x4"), dtype="int32")
    # LLVM's signature (LLVM 20 on): (<16 x i32> acc, <64 x i8> unsigned, <64 x i8> signed)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VPDPBUSD), acc, weights_u8x64,
                                   T.reinterpret(T.Broadcast(x_quad, LANES), dtype="int8x64"), dtype="int32x16")


@functools.cache  # the frontend asks once per call site; writing the TVMScript takes up to a second
def quantize_activations(in_features: int, group: int, x_dtype: str):
    """x [1, n, K] -> (x_q int8 [1, n, K], x_scale float32 [1, n, K / group], x_sum int32 [1, n, K / group]),
    vnni_matmul's input: per group, x_scale = max |x| / 127 (1 for an all-zero group), x_q = round half even
    (x / x_scale), x_sum = sum of x_q. A row per task, a group LANES values at a time (the graph's own
    reductions ran 5x slower, a few percent of a q8 prefill)."""
    K, G = in_features, in_features // group
    if group % LANES:
        raise ValueError(f"groups of {group} do not split into {LANES}-lane vectors")
    parts = group // LANES

    @T.prim_func(private=True, s_tir=True)
    def kernel(var_x: T.handle, var_xq: T.handle, var_xs: T.handle, var_xsum: T.handle):
        T.func_attr(HAND_SCHEDULED)
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), x_dtype)
        xq = T.match_buffer(var_xq, (1, n, K), "int8")
        xs = T.match_buffer(var_xs, (1, n, G), "float32")
        xsum = T.match_buffer(var_xsum, (1, n, G), "int32")
        for t in T.parallel(n):
            with T.sblock("quantize_activations"):
                T.reads(x[0, t, 0:K])
                T.writes(xq[0, t, 0:K], xs[0, t, 0:G], xsum[0, t, 0:G])
                largest = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
                sums = T.sblock_alloc_buffer((LANES,), "int32", scope="local")
                scale = T.sblock_alloc_buffer((1,), "float32", scope="local")
                for g in range(G):
                    for j in T.vectorized(LANES):
                        largest[j] = T.float32(0)
                    for p in T.unroll(parts):
                        for j in T.vectorized(LANES):
                            largest[j] = T.max(largest[j],
                                               T.abs(T.Cast("float32", x[0, t, g * group + p * LANES + j])))
                    scale[0] = fold_lanes(largest, 0, LANES, "float32", T.max)  # a maximum: any order
                    scale[0] = T.if_then_else(scale[0] > T.float32(0), scale[0] / T.float32(127), T.float32(1))
                    xs[0, t, g] = scale[0]
                    for j in T.vectorized(LANES):
                        sums[j] = 0
                    for p in T.unroll(parts):
                        for j in T.vectorized(LANES):
                            xq[0, t, g * group + p * LANES + j] = T.Cast("int8", T.nearbyint(
                                T.Cast("float32", x[0, t, g * group + p * LANES + j]) / scale[0]))
                            sums[j] = sums[j] + T.Cast("int32", xq[0, t, g * group + p * LANES + j])
                    xsum[0, t, g] = fold_lanes(sums, 0, LANES, "int32")

    return kernel

