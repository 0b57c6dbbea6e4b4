"""The q8/q4 GEMM of every x86 variant this CPU runs, at the 6B's width, next to the read bound and the peak.

    python benchmarks/cpu_variants.py [--variants avx2,avx-vnni,avx512-vnni] [--rows 1,8,128,512] [--rounds 5]

For each int8 dot product this CPU has (AVX2 everywhere; AVX-VNNI and AVX-512 VNNI where present), each GEMM
(W_in 4096 x 28672, W_out 16384 x 4096, lm_head 4096 x 50688) in q8 and q4 for each row count: ms, GOP/s, the
read bound (weight bytes / the read bandwidth measured in the same run), the arithmetic bound at the measured
peak of the variant's instruction mix, and their ratio. Variants of one GEMM are timed round by round (ABAB) in
one process, so their ratios compare. Kernels compile for this host's target, or with --cpu NAME for another
(`--cpu haswell` on an AVX-512 machine times the AVX2 kernel there, which is how it is tested on any x86 CPU).

Whole models (decode, prefill, old and new) are timed by `gptj-tvm bench A B` on two artifacts of one model,
e.g. `--quantized-gemm float32` (the levels widened: what AVX2 CPUs ran before) against the default.
Writes benchmarks/results/cpu_variants.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gptj_tvm  # noqa: F401  (importing it sets TVM_NUM_THREADS before TVM starts)
import tvm
from gptj_tvm.frontend.layouts import quantized as quant
from gptj_tvm.tir_kernels.ymm_gemm import PMADDUBSW, PMADDWD, VPDPBUSD, int8_matmul
from gptj_tvm.runtime.bench import read_bandwidth
from gptj_tvm.targets.host import cpu_flags, cpu_model
from gptj_tvm.targets.llvm import cpu_target, host_target, target_isa
from report import time_kernels, write_result
from tvm.script import tirx as T

GEMMS = {"W_in": (4096, 28672), "W_out": (16384, 4096), "lm_head": (4096, 50688)}
CHAINS, ITERS = 12, 4_000_000  # 12 accumulators: enough in flight to cover the latency, and they fit


def peak(variant: str, threads: int, target) -> float:
    """Integer ops per second of the variant's dot-product mix on every thread, CHAINS independent chains of
    ymm (zmm for AVX-512 VNNI) registers: vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd + vpaddd (64 ops per 32
    bytes either way on ymm)."""
    lanes = 16 if variant == "avx512-vnni" else 8
    vec, byte_vec = f"int32x{lanes}", f"int8x{4 * lanes}"

    def step(acc):
        ones = T.reinterpret(T.Broadcast(T.uint32(0x01010101), lanes), dtype=byte_vec)
        twos = T.reinterpret(T.Broadcast(T.uint32(0x02020202), lanes), dtype=byte_vec)
        if variant == "avx2":  # the signed bytes are the accumulator's, so that LLVM cannot fold the chain
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(PMADDUBSW), ones,
                                            T.reinterpret(acc, dtype=byte_vec), dtype="int16x16")
            return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(PMADDWD), pairs,
                                                 T.Broadcast(T.int16(1), 16), dtype=vec)
        name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else VPDPBUSD
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), acc, ones, twos, dtype=vec)

    @T.prim_func(s_tir=True)
    def main(out: T.Buffer((threads, CHAINS * lanes), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            with T.sblock("peak"):
                acc = T.sblock_alloc_buffer((CHAINS * lanes,), "int32", scope="local")
                for c in T.vectorized(CHAINS * lanes):
                    acc[c] = c
                for _ in range(ITERS):
                    for c in T.unroll(CHAINS):
                        acc[T.ramp(c * lanes, 1, lanes)] = step(acc.vload([c * lanes], vec))
                for c in T.vectorized(CHAINS * lanes):
                    out[t, c] = acc[c]

    lib = tvm.tirx.build(tvm.IRModule({"main": main}), target=target)
    out = tvm.runtime.empty((threads, CHAINS * lanes), "int32")
    lib["main"](out)
    start = time.perf_counter()
    lib["main"](out)
    return threads * ITERS * CHAINS * lanes * 8 / (time.perf_counter() - start)


def gemm_rows(variants, rows_list, rounds, target, peaks, bandwidth) -> list[dict]:
    rng = np.random.default_rng(0)
    out_rows = []
    for gemm, (k, n) in GEMMS.items():
        for scheme in ("q8", "q4"):
            levels = rng.integers(quant.QMIN[scheme], quant.QMAX[scheme] + 1, size=(k, n)).astype(np.int8)
            weight = [tvm.runtime.tensor(quant.pack(levels, scheme)),
                      tvm.runtime.tensor(quant.tiled(rng.uniform(0.5, 2, (k // 32, n)).astype(np.float16)))]
            del levels
            weight_bytes = k * n * (1 if scheme == "q8" else 0.5) + k * n // 32 * 2
            spec = (k, n, scheme, quant.GROUP, quant.TILE, quant.OFFSET[scheme])
            libs = {v: tvm.tirx.build(tvm.IRModule({"main": int8_matmul(v, *spec).with_attr("global_symbol", "main")}),
                                      target=target) for v in variants}
            for rows in rows_list:
                inputs = [tvm.runtime.tensor(rng.integers(-127, 128, (1, rows, k)).astype(np.int8)),
                          tvm.runtime.tensor(rng.uniform(0.1, 1, (1, rows, k // 32)).astype(np.float32)),
                          tvm.runtime.tensor(rng.integers(-500, 500, (1, rows, k // 32)).astype(np.int32)), *weight]
                out = tvm.runtime.empty((1, rows, n), "float32")
                repeats = max(3, int(1e9 / (2 * k * n * rows)))  # about 1 GOP a sample
                times = time_kernels(libs, inputs, out, rounds, repeats)
                ops = 2 * k * n * rows
                for v in variants:
                    ms = 1e3 * float(np.median(times[v]))
                    row = {"gemm": gemm, "format": scheme, "variant": v, "k": k, "n": n, "rows": rows, "ms": ms,
                           "gops": ops / ms / 1e6, "read_bound_ms": 1e3 * weight_bytes / bandwidth,
                           "arithmetic_bound_ms": 1e3 * ops / peaks[v]}
                    row["x_bound"] = ms / max(row["read_bound_ms"], row["arithmetic_bound_ms"])
                    row["share_of_peak"] = row["gops"] * 1e9 / peaks[v]
                    out_rows.append(row)
                    print(f"{gemm:8s} {scheme} {v:12s} {rows:4d} rows: {ms:9.2f} ms ({row['gops']:5.0f} GOP/s, "
                          f"{100 * row['share_of_peak']:3.0f}% of peak)  bounds: read {row['read_bound_ms']:7.2f}, "
                          f"arithmetic {row['arithmetic_bound_ms']:7.2f} ms -> {row['x_bound']:.2f}x", flush=True)
    return out_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help="comma-separated (default: every one this CPU runs)")
    parser.add_argument("--cpu", help="compile for this -mcpu instead of the host's (it must run here)")
    parser.add_argument("--rows", default="1,8,128,512")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/cpu_variants.json")
    args = parser.parse_args(argv)
    target = cpu_target(args.cpu) if args.cpu else host_target()
    isa = target_isa(target)
    runnable = [v for v, needs in quant.INT8_DOTS.items() if set(needs) <= isa]
    variants = args.variants.split(",") if args.variants else runnable
    unknown = [v for v in variants if v not in runnable]
    if unknown or not isa <= cpu_flags():
        print(f"error: {', '.join(unknown) or 'the target'} cannot run on this CPU ({cpu_model()}); it runs "
              f"{', '.join(runnable)}", file=sys.stderr)
        return 1
    threads = int(os.environ["TVM_NUM_THREADS"])
    peaks = {v: peak(v, threads, target) for v in variants}
    bandwidth = read_bandwidth() or float("nan")
    print(f"{cpu_model()}, target -mcpu={target.attrs['mcpu']}, {threads} threads, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; peaks " + ", ".join(f"{v} {p / 1e9:.0f} GOP/s" for v, p in peaks.items()))
    rows = [int(r) for r in args.rows.split(",")]
    result = {"cpu": cpu_model(), "mcpu": str(target.attrs["mcpu"]), "threads": threads,
              "read_bandwidth_gb_s": bandwidth / 1e9, "peaks_gops": {v: p / 1e9 for v, p in peaks.items()},
              "gemms": gemm_rows(variants, rows, args.rounds, target, peaks, bandwidth)}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
