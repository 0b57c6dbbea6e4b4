"""bfloat16 GEMMs on column pairs (tir_kernels/pair_gemm.py) against column tiles, in one process, next to the bound.

    python benchmarks/pair_layout.py [--layers 8] [--rounds 10] [--out benchmarks/results/pair_layout.json]

GPT-J-6B's W_in (4096 x 28672) and W_out (20480 x 4096), each with its bias, in both layouts: the column tiles
with the default rule's schedule (schedules/cpu_matmul.py, what float32/float16 artifacts and a bfloat16 one
compiled with a tuning database run) and the pair kernels (what a bfloat16 artifact runs). Decode: `--layers`
layers of W_in then W_out GEMVs per layout, far more weights than the caches hold, the layouts alternating
round by round, so the machine's drifting bandwidth (other tenants) falls on both alike; the bound is the
weight bytes over the read bandwidth measured before and after (the best of the two). Prefill: one W_in and
one W_out GEMM of 128 rows per layout (the tiles at a static length, as a prefill bucket compiles them).
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ml_dtypes
import numpy as np


import tvm
from tvm import te
from tvm.s_tir import dlight as dl

from gptj_tvm.frontend.layouts.column_tiles import weight_tile
from gptj_tvm.tir_kernels.pair_gemm import pair_matmul
from gptj_tvm.frontend.layouts.column_pairs import pair_tile, paired
from gptj_tvm.frontend.layouts.column_tiles import tiled
from gptj_tvm.schedules.cpu_matmul import CPUMatmul
from gptj_tvm.targets.bandwidth import read_bandwidth
from gptj_tvm.targets.llvm import host_target

from report import write_result  # benchmarks/report.py (a script's folder is on its path)


SHAPES = {"W_in": (4096, 28672), "W_out": (20480, 4096)}
PREFILL_ROWS = 128
LAYOUTS = ("tiles", "pairs")


def tiles_kernel(k: int, n: int, rows: int, target):
    """y = x W + b with W in column tiles, scheduled by the default rule, as the model's tiled_matmul + bias."""
    tile = weight_tile(n)
    x = te.placeholder((1, rows, k), "bfloat16", name="x")
    w = te.placeholder((n // tile, k, tile), "bfloat16", name="w")
    b = te.placeholder((n,), "float32", name="b")
    r = te.reduce_axis((0, k), name="k")
    mm = te.compute((1, rows, n), lambda i, t, j: te.sum(
        x[i, t, r].astype("float32") * w[j // tile, r, j % tile].astype("float32"), axis=r), name="matmul")
    y = te.compute((1, rows, n), lambda i, t, j: mm[i, t, j] + b[j], name="add")
    with target:
        mod = dl.ApplyDefaultSchedule(CPUMatmul())(tvm.IRModule({"main": te.create_prim_func([x, w, b, y])}))
    return tvm.tirx.build(mod, target=target)["main"]


def pairs_kernel(k: int, n: int, target):
    func = pair_matmul(k, n, pair_tile(k, n), "bfloat16", bias=True).with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=target)["main"]


def arguments(k: int, n: int, rows: int, rng) -> dict[str, tuple]:
    """The same x, W, bias in both layouts, and an output each."""
    w = rng.standard_normal((k, n), dtype=np.float32).astype(ml_dtypes.bfloat16)
    x = tvm.runtime.tensor(rng.standard_normal((1, rows, k), dtype=np.float32).astype(ml_dtypes.bfloat16))
    b = tvm.runtime.tensor(rng.standard_normal(n, dtype=np.float32))
    return {name: (x, tvm.runtime.tensor(layout(w)), b, tvm.runtime.empty((1, rows, n), "float32"))
            for name, layout in (("tiles", tiled), ("pairs", paired))}


def decode(layers: int, rounds: int, target, rng) -> dict:
    kernels = {"tiles": {s: tiles_kernel(k, n, 1, target) for s, (k, n) in SHAPES.items()},
               "pairs": {s: pairs_kernel(k, n, target) for s, (k, n) in SHAPES.items()}}
    calls = {name: [] for name in LAYOUTS}
    for _ in range(layers):
        for s, (k, n) in SHAPES.items():
            for name, args in arguments(k, n, 1, rng).items():
                calls[name].append((kernels[name][s], args))
    for name in LAYOUTS:  # the same results (float32 sums in the same k order)
        for kernel, args in calls[name][:2]:
            kernel(*args)
    diff = max(float(np.abs(calls["tiles"][i][1][3].numpy() - calls["pairs"][i][1][3].numpy()).max())
               for i in range(2))
    bandwidth = read_bandwidth()
    times = {name: [] for name in LAYOUTS}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (LAYOUTS if r % 2 else LAYOUTS[::-1]):
            start = time.perf_counter()
            for kernel, args in calls[name]:
                kernel(*args)
            if r:
                times[name].append((time.perf_counter() - start) / layers)
    bandwidth = max(bandwidth, read_bandwidth())
    layer_bytes = sum(2 * k * n for k, n in SHAPES.values())
    ratios = np.array(times["pairs"]) / np.array(times["tiles"])
    return {"layers": layers, "rounds": rounds, "read_bandwidth_gb_s": bandwidth / 1e9,
            "bound_ms_per_layer": 1e3 * layer_bytes / bandwidth, "max_abs_difference": diff,
            **{f"{name}_ms_per_layer": 1e3 * float(np.median(times[name])) for name in LAYOUTS},
            "pairs_over_tiles_median": float(np.median(ratios)),
            "pairs_over_tiles_range": [float(ratios.min()), float(ratios.max())]}


def prefill(rounds: int, target, rng) -> dict:
    result = {}
    for s, (k, n) in SHAPES.items():
        kernels = {"tiles": tiles_kernel(k, n, PREFILL_ROWS, target), "pairs": pairs_kernel(k, n, target)}
        args = arguments(k, n, PREFILL_ROWS, rng)
        times = {name: [] for name in LAYOUTS}
        for r in range(rounds + 1):
            for name in LAYOUTS:
                start = time.perf_counter()
                kernels[name](*args[name])
                if r:
                    times[name].append(time.perf_counter() - start)
        flops = 2 * PREFILL_ROWS * k * n
        result[s] = {f"{name}_ms": 1e3 * float(np.median(times[name])) for name in LAYOUTS}
        result[s].update({f"{name}_gflop_s": flops / np.median(times[name]) / 1e9 for name in LAYOUTS})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of W_in + W_out per layout (decode)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per layout")
    parser.add_argument("--out", default="benchmarks/results/pair_layout.json")
    args = parser.parse_args(argv)
    target = host_target()
    rng = np.random.default_rng(0)
    result = {"threads": os.environ["TVM_NUM_THREADS"], "decode": decode(args.layers, args.rounds, target, rng),
              "prefill": prefill(3, target, rng)}
    d = result["decode"]
    print(f"bfloat16 W_in + W_out of GPT-J-6B, {result['threads']} threads; read bandwidth "
          f"{d['read_bandwidth_gb_s']:.1f} GB/s")
    print("| decode, per layer | ms | x bound |\n| --- | --- | --- |")
    print(f"| bound | {d['bound_ms_per_layer']:.2f} | 1.00 |")
    for name in LAYOUTS:
        ms = d[f"{name}_ms_per_layer"]
        print(f"| column {name} | {ms:.2f} | {ms / d['bound_ms_per_layer']:.2f} |")
    low, high = d["pairs_over_tiles_range"]
    print(f"pairs / tiles per round: median {d['pairs_over_tiles_median']:.3f} ({low:.3f}-{high:.3f}); "
          f"largest difference of the outputs {d['max_abs_difference']:.1e}")
    print(f"| prefill, {PREFILL_ROWS} rows | tiles ms | pairs ms | tiles GFLOP/s | pairs GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for s, r in result["prefill"].items():
        print(f"| {s} | {r['tiles_ms']:.1f} | {r['pairs_ms']:.1f} | {r['tiles_gflop_s']:.0f} | "
              f"{r['pairs_gflop_s']:.0f} |")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
