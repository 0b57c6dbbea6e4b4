"""The q8/q4 GEMM on 256-bit integer dot products, for x86 CPUs without AVX-512 VNNI, written in TIR:
- "avx-vnni" (Alder Lake and later Intel, Zen 5): the VEX-encoded `vpdpbusd` on ymm, one instruction per 32
  weight bytes, the levels unsigned as stored and the offset taken back out per group (as tir_kernels/vnni_gemm.py);
- "avx2" (every x86-64 CPU since Haswell): `vpmaddubsw` (unsigned x signed bytes, adjacent pairs summed to
  saturating int16) and `vpmaddwd` against ones (pairs of int16 summed to int32), as ggml's q4_0 x q8_0 dot.
  A stored q8 level (q + 128, up to 255) times an int8 input can pass int16 in a pair, so q8 runs signed: the
  byte XOR 0x80 is q, `vpsignb` moves q's sign onto x, and q's magnitude (`vpsignb` of q by itself: 128 for
  -128, read unsigned) goes in the unsigned operand, at most 2 x 128 x 127 < 2^15 a pair. A q4 nibble (0..15) is
  unsigned as stored: a pair is at most 2 x 15 x 127, so a group's eight `vpmaddubsw` are summed in int16 (at
  most 16 x 15 x 127 < 2^15) and widened by one `vpmaddwd`, and the offset comes out with the group's x_sum.

Same stored layout, input quantizer (tir_kernels/vnni_gemm.quantize_activations) and math as vnni_matmul: each
group's integer dot product is exact, and y[t, c] = sum over groups, in group order, of dot * (w_scale *
x_scale) in float32, so every ISA gives the same bits, in every block shape.

One task per column tile of TILE outputs; K in chunks of CHUNK_GROUPS groups (the sum goes on in y), so the
chunk's weights stay in cache while every row block passes over them. Sixteen ymm registers hold a block's
accumulators and dot products: decode's 1 to 3 rows run a row at a time, q8 over a quarter of the tile (2 vectors
of 8 columns: one whole cache line of each 256-byte row of levels, so the tile's four passes read disjoint
lines) and q4 over all of it; more rows run one 8-column vector at a time in blocks of ROWS rows, each weight
load (and its unpacking) shared by the block's rows. The first block of each pass asks for its lines one chunk
further on (into L2), as the other weight-streaming kernels do.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from .common import WEIGHT_PREFETCH_LOCALITY, prefetch
from .vnni_gemm import entry_points, store_macro, vnni_matmul

ISAS = ("avx-vnni", "avx2")
LANES = 8  # 32-bit lanes of a 256-bit register: 8 columns x 4 input features = 32 weight bytes
ROWS = 4  # rows per block from STEP_MIN rows: 4 x (acc + dot) of the 16 ymm registers
# 8-column vectors per pass for fewer rows: q8 one cache line of each 256-byte row of levels, q4 the whole tile
# (its 1-row GEMVs went from 1.55-1.85x the read bound to 1.05-1.1x; q8's did not move with it, at 1.7-2x)
DECODE_VECTORS = {"q8": 2, "q4": 8}
STEP_MIN = 4
CHUNK_GROUPS = 16
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"  # LLVM selects the VEX form on a target with avxvnni
PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"
PMADDWD = "llvm.x86.avx2.pmadd.wd"
PSIGNB = "llvm.x86.avx2.psign.b"


@functools.cache  # the frontend asks once per call site; writing the TVMScript takes up to a second
def ymm_matmul(in_features: int, out_features: int, scheme: str, group: int, tile: int, offset: int, isa: str,
               bias: bool = False, residual: bool = False):
    """vnni_matmul's signature and result ((x_q, x_scale, x_sum, weight, w_scale[, bias[, residual]]) -> y
    [1, n, N] float32) on `isa`'s 256-bit dot products."""
    if isa not in ISAS:
        raise ValueError(f"unknown 256-bit int8 dot product {isa!r}: one of {', '.join(ISAS)}")
    if residual and not bias:
        raise ValueError("a residual comes with a bias (the fused block's W_out)")
    GROUP, TILE = group, tile
    K, N, G = in_features, out_features, in_features // GROUP
    tiles, tile_vectors = N // TILE, TILE // LANES
    q4 = scheme == "q4"
    rows = K // 8 if q4 else K // 4
    group_rows = GROUP // 8 if q4 else GROUP // 4
    chunks = (G + CHUNK_GROUPS - 1) // CHUNK_GROUPS
    chunk_rows = CHUNK_GROUPS * group_rows
    decode_vectors = DECODE_VECTORS[scheme]
    if isa == "avx2" and q4 and group_rows * 2 * 2 * 15 * 127 >= 2 ** 15:
        raise ValueError(f"groups of {group} can overflow q4's int16 sums")

    def x_quad(xq, t, k):
        """x_q[t, k .. k + 4] in each 32-bit lane, as 32 bytes."""
        return T.reinterpret(T.Broadcast(T.reinterpret(xq.vload([0, t, k], "int8x4"), dtype="int32"), LANES),
                             dtype="int8x32")

    def levels(weight, tile, row, vector, shift):
        """32 bytes of stored levels: q8's, or q4's low (shift 0) or high (shift 4) nibbles."""
        packed = weight.vload([tile, row, vector * LANES, 0], "uint8x32")
        if shift:
            packed = T.shift_right(packed, T.Broadcast(T.uint8(shift), 32))
        return T.bitwise_and(packed, T.Broadcast(T.uint8(15), 32)) if q4 else packed

    def pairs_to_int32(pairs):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(PMADDWD), pairs, T.Broadcast(T.int16(1), 16),
                                       dtype="int32x8")

    # q4's group dot product runs as one statement per stored row, every row of the block in turn, into `dot`
    # (128-row GEMMs 18% faster than one expression per row, where LLVM unpacked a group's nibbles for all rows
    # first and spilled them); q8's as one expression per row (the statements ran its 128-row GEMMs 30% slower:
    # LLVM then spilled the signed levels and magnitudes of a group instead)
    step_major = q4
    pairs16 = isa == "avx2" and q4  # dot holds int16 pairs, widened once per group
    dot_lanes = 16 if pairs16 else LANES
    dot_vec = "int16x16" if pairs16 else "int32x8"

    def dot_start(xsum, t, g):
        """dot before the group's first row: -OFFSET x_sum where the levels go in unsigned (vpdpbusd)."""
        if isa == "avx-vnni":
            return T.Broadcast(xsum[0, t, g] * (-offset), LANES)
        return T.Broadcast(T.int16(0), 16) if pairs16 else T.Broadcast(T.int32(0), LANES)

    def dot_step(dot, xq, weight, tile, row, vector, t, k):
        """dot + stored row `row`'s share: input features k .. k + 4 (q4: and k + 4 .. k + 8 from the high
        nibbles) of row t, times the vector's 8 columns."""
        if isa == "avx-vnni":
            dot = _vpdpbusd(dot, levels(weight, tile, row, vector, 0), x_quad(xq, t, k))
            return _vpdpbusd(dot, levels(weight, tile, row, vector, 4), x_quad(xq, t, k + 4)) if q4 else dot
        if q4:
            return dot + _pmaddubsw(levels(weight, tile, row, vector, 0), x_quad(xq, t, k)) + _pmaddubsw(
                levels(weight, tile, row, vector, 4), x_quad(xq, t, k + 4))
        signed = T.reinterpret(T.bitwise_xor(levels(weight, tile, row, vector, 0), T.Broadcast(T.uint8(128), 32)),
                               dtype="int8x32")
        return dot + pairs_to_int32(_pmaddubsw(_psignb(signed, signed), _psignb(x_quad(xq, t, k), signed)))

    def group_dot(xq, xsum, weight, tile, g, vector, t):
        """dot_start and every dot_step of the group, as one expression."""
        dot = dot_start(xsum, t, g)
        for step in range(group_rows):
            dot = dot_step(dot, xq, weight, tile, g * group_rows + step, vector, t, g * GROUP + step * (8 if q4 else 4))
        return dot

    def dot_value(dot, xsum, t, g):
        """The group's exact integer dot product from dot after its last row."""
        return pairs_to_int32(dot) - T.Broadcast(xsum[0, t, g] * offset, LANES) if pairs16 else dot

    store = store_macro(LANES)

    @T.macro
    def block_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v0, vectors, chunk, t0, count, streams):
        """y[t0 .. t0 + count, vectors v0 .. v0 + vectors of the tile] over chunk `chunk`'s groups."""
        acc = T.sblock_alloc_buffer((count * vectors * LANES,), "float32", scope="local")
        dot = T.sblock_alloc_buffer((count * vectors * dot_lanes,), "int16" if pairs16 else "int32", scope="local")
        for i in T.unroll(count):
            for v in T.unroll(vectors):
                if chunk == 0:
                    for c in T.vectorized(LANES):
                        acc[(i * vectors + v) * LANES + c] = T.float32(0)
                else:
                    for c in T.vectorized(LANES):
                        acc[(i * vectors + v) * LANES + c] = y[0, t0 + i, tile * TILE + (v0 + v) * LANES + c]
        for g in range(chunk * CHUNK_GROUPS, T.min(chunk * CHUNK_GROUPS + CHUNK_GROUPS, G)):
            if streams:  # one chunk on: this pass's next turn (past the tile: the next tile, or harmless)
                for step in T.unroll(group_rows):
                    for line in T.unroll((vectors * LANES * 4 + 63) // 64):
                        prefetch(weight[tile, g * group_rows + step + chunk_rows, v0 * LANES + line * 16, 0],
                                 WEIGHT_PREFETCH_LOCALITY)
            if step_major:  # decided as the kernel is written (a Python condition)
                for i in T.unroll(count):
                    for v in T.unroll(vectors):
                        dot[T.ramp((i * vectors + v) * dot_lanes, 1, dot_lanes)] = dot_start(xsum, t0 + i, g)
                for step in T.unroll(group_rows):
                    for i in T.unroll(count):
                        for v in T.unroll(vectors):
                            dot[T.ramp((i * vectors + v) * dot_lanes, 1, dot_lanes)] = dot_step(
                                dot.vload([(i * vectors + v) * dot_lanes], dot_vec), xq, weight, tile,
                                g * group_rows + step, v0 + v, t0 + i, g * GROUP + step * (8 if q4 else 4))
            else:
                for i in T.unroll(count):
                    for v in T.unroll(vectors):
                        dot[T.ramp((i * vectors + v) * dot_lanes, 1, dot_lanes)] = group_dot(
                            xq, xsum, weight, tile, g, v0 + v, t0 + i)
            for i in T.unroll(count):
                for v in T.unroll(vectors):
                    acc[T.ramp((i * vectors + v) * LANES, 1, LANES)] = acc.vload(
                        [(i * vectors + v) * LANES], "float32x8") + T.Cast("float32x8", dot_value(
                            dot.vload([(i * vectors + v) * dot_lanes], dot_vec), xsum, t0 + i, g)) * (
                        T.Cast("float32x8", w_scale.vload([tile, g, (v0 + v) * LANES], "float16x8"))
                        * T.Broadcast(xs[0, t0 + i, g], LANES))
        for i in T.unroll(count):
            for v in T.unroll(vectors):
                store(y, bias, residual, t0 + i, tile * TILE + (v0 + v) * LANES, acc, (i * vectors + v) * LANES,
                      chunk < chunks - 1)

    @T.macro
    def block(name, xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v0, vectors, chunk, t0, count,
              streams):
        with T.sblock(name):
            T.reads(xq[0, t0:t0 + count, 0:K], xs[0, t0:t0 + count, 0:G], xsum[0, t0:t0 + count, 0:G],
                    weight[tile, 0:rows, 0:TILE, 0:4], w_scale[tile, 0:G, 0:TILE],
                    y[0, t0:t0 + count, tile * TILE:tile * TILE + TILE])
            T.writes(y[0, t0:t0 + count, tile * TILE:tile * TILE + TILE])
            block_rows(xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v0, vectors, chunk, t0, count,
                       streams)

    @T.macro
    def gemm(xq, xs, xsum, weight, w_scale, y, bias, residual, n):
        for tile in T.parallel(tiles):
            for chunk in range(chunks):
                if n < STEP_MIN:  # decode: a row at a time, over decode_vectors at a time (and no rows at all)
                    for part in range(tile_vectors // decode_vectors):
                        for t in range(n):
                            block("ymm_matmul_decode", xq, xs, xsum, weight, w_scale, y, bias, residual, tile,
                                  part * decode_vectors, decode_vectors, chunk, t, 1, True)
                else:
                    for v in range(tile_vectors):
                        block("ymm_matmul_first", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v, 1,
                              chunk, 0, ROWS, True)
                        for b in range(1, n // ROWS):
                            block("ymm_matmul", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v, 1,
                                  chunk, b * ROWS, ROWS, False)
                        if n % ROWS >= 2:
                            block("ymm_matmul_rest2", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v, 1,
                                  chunk, n // ROWS * ROWS, 2, False)
                        if n % 2 == 1:
                            block("ymm_matmul_rest1", xq, xs, xsum, weight, w_scale, y, bias, residual, tile, v, 1,
                                  chunk, n - 1, 1, False)

    return entry_points(gemm, K, N, G, tiles, rows, TILE, bias, residual)


def _pmaddubsw(unsigned_bytes, signed_bytes):
    """Adjacent pairs of unsigned x signed byte products, summed to saturating int16."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(PMADDUBSW), unsigned_bytes, signed_bytes,
                                   dtype="int16x16")


def _psignb(value, sign):
    """value's bytes negated where sign's are negative, zeroed where they are zero."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(PSIGNB), value, sign, dtype="int8x32")


def _vpdpbusd(acc, unsigned_bytes, signed_bytes):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VPDPBUSD), acc, unsigned_bytes, signed_bytes,
                                   dtype="int32x8")


def int8_matmul(isa: str, in_features: int, out_features: int, scheme: str, group: int, tile: int, offset: int,
                bias: bool = False, residual: bool = False):
    """The q8/q4 GEMM kernel for one of quantized.INT8_DOTS: vnni_matmul for avx512-vnni, else ymm_matmul."""
    spec = (in_features, out_features, scheme, group, tile, offset)
    if isa == "avx512-vnni":
        return vnni_matmul(*spec, bias=bias, residual=residual)
    return ymm_matmul(*spec, isa, bias=bias, residual=residual)
