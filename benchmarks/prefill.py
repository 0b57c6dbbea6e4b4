"""Prompt processing against the arithmetic limit: the GEMMs of the 6B on this CPU's dot-product instructions.

    python benchmarks/prefill.py [--old-kernels REV] [--artifacts OLD NEW ...] [--transformers CHECKPOINT_DIR]

1. The instructions' peak, measured here: a TIR kernel of 12 independent accumulator chains per thread on every
   thread, for fp32 FMA (32 FLOP per zmm instruction), vdpbf16ps (64) and vpdpbusd (128 integer ops); reported
   with the clock /proc/cpuinfo gives, as FLOP per cycle per core (peak / (threads x clock)). Where the CPU has
   VNNI, also the q8/q4 group ceiling: the rate of a group's whole instruction mix (its vpdpbusd, then the float
   conversion, scale multiply and FMA) with no memory traffic, and the time the 6B's prefill GEMMs would take at it.
2. Per GEMM at the 6B's width (W_in 4096 x 28672, W_out 20480 x 4096, lm_head 4096 x 50688), for 128 and 512
   rows (prefill) and 2, 4, 8, 16 (batched decode): the kernels of git revision REV (default: before the dot
   products) and of this tree, built in one process and timed round by round (ABAB), ms, GFLOP/s, the share of
   the instruction's peak, and next to the read bound (the weight bytes / read bandwidth) and the arithmetic
   bound (FLOP / peak); bfloat16 (pairs), q8 and q4.
3. With --artifacts OLD NEW (pairs of artifacts of one 6B model, old kernels and new): prefill of 128 and 512
   tokens, interleaved in one process per pair, tokens/s and time to first token; with --transformers, the same
   prompts through transformers in a process of its own (torch stays out of this one).
Writes benchmarks/results/prefill.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

import gptj_tvm  # sets TVM_NUM_THREADS's default before TVM starts
import gptj_tvm.runtime.artifact
from gptj_tvm.core.child import run_json
from gptj_tvm.core.errors import GptjError
import tvm
from gptj_tvm.frontend.layouts import quantized as quant
from gptj_tvm.frontend.layouts.column_pairs import pair_tile, paired
from gptj_tvm.tir_kernels import pair_gemm, vnni_gemm
from gptj_tvm.runtime.bench import read_bandwidth
from gptj_tvm.targets.host import cpu_model, has_avx512_bf16, has_vnni
from gptj_tvm.targets.llvm import host_target
from report import time_kernels, write_result
from tvm.script import tirx as T

GEMMS = {"W_in": (4096, 28672), "W_out": (20480, 4096), "lm_head": (4096, 50688)}
ROWS = (2, 4, 8, 16, 128, 512)
LAYERS = 28  # the 6B's; W_in and W_out run once a layer, lm_head once
PREFILL_OPS_PER_TOKEN = 2 * (LAYERS * (GEMMS["W_in"][0] * GEMMS["W_in"][1] + GEMMS["W_out"][0] * GEMMS["W_out"][1])
                             + GEMMS["lm_head"][0] * GEMMS["lm_head"][1])
CHAINS, ITERS = 12, 2_000_000


def peak_kernel(kind: str, threads: int):
    """12 independent chains per thread of one instruction, ITERS times: its peak rate on every thread."""
    if kind == "fma":
        vec, op = "float32x16", None
    elif kind == "vdpbf16ps":
        vec, op = "float32x16", pair_gemm.DOT_FUNCTIONS[16]
    else:
        vec, op = "int32x16", None

    @T.prim_func(s_tir=True)
    def main(out: T.Buffer((threads, CHAINS * 16), vec.split("x")[0])):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            with T.sblock("peak"):
                acc = T.sblock_alloc_buffer((CHAINS * 16,), vec.split("x")[0], scope="local")
                with T.attr(0, "pragma_import_llvm", pair_gemm.DOT_LLVM):
                    for c in T.vectorized(CHAINS * 16):
                        acc[c] = T.Cast(vec.split("x")[0], c)
                    for _ in range(ITERS):
                        for c in T.unroll(CHAINS):
                            if kind == "fma":
                                acc[T.ramp(c * 16, 1, 16)] = acc.vload([c * 16], vec) * T.Broadcast(
                                    T.float32(0.999), 16) + T.Broadcast(T.float32(0.001), 16)
                            elif kind == "vdpbf16ps":
                                acc[T.ramp(c * 16, 1, 16)] = T.call_pure_extern(
                                    vec, op, acc.vload([c * 16], vec), T.Broadcast(T.uint32(0x3F003F00), 16),
                                    T.Broadcast(T.uint32(0x3E803E80), 16))
                            else:
                                acc[T.ramp(c * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                    vec, T.llvm_lookup_intrinsic_id(vnni_gemm.VPDPBUSD), acc.vload([c * 16], vec),
                                    T.reinterpret(T.Broadcast(T.uint32(0x01010101), 16), dtype="int8x64"),
                                    T.reinterpret(T.Broadcast(T.uint32(0x02020202), 16), dtype="int8x64"))
                    for c in T.vectorized(CHAINS * 16):
                        out[t, c] = acc[c]

    per_instruction = {"fma": 32, "vdpbf16ps": 64, "vpdpbusd": 128}[kind]
    return rate(main, [tvm.runtime.empty((threads, CHAINS * 16), vec.split("x")[0])],
                threads * ITERS * CHAINS * per_instruction)


def rate(func, args: list, ops: float) -> float:
    """ops per second of one call of func (built for this CPU) after a first call."""
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=host_target())
    lib["main"](*args)
    start = time.perf_counter()
    lib["main"](*args)
    return ops / (time.perf_counter() - start)


def group_ceiling(threads: int) -> float:
    """The rate of a q8/q4 group's instruction mix, without memory: the VNNI GEMM's prompt shape (3 rows x 4
    lanes) with its operands in registers. Per row, 16 columns and group of quant.GROUP features: GROUP / 4
    vpdpbusd, then the int -> float conversion, the scale multiply (w_scale x x_scale) and the accumulating FMA.
    Measured rather than derived, because which of these share vpdpbusd's pipes is the CPU's business (on Zen 4
    the multiply and the FMA do, the conversion does not)."""
    rows, lanes, steps, iters = vnni_gemm.PROMPT_ROWS, 4, quant.GROUP // 4, ITERS // 4

    def dot(acc, step):
        return T.call_llvm_pure_intrin("int32x16", T.llvm_lookup_intrinsic_id(vnni_gemm.VPDPBUSD), acc,
                                       T.reinterpret(T.Broadcast(T.uint32(0x01010101 + step), 16), dtype="int8x64"),
                                       T.reinterpret(T.Broadcast(T.uint32(0x02020202), 16), dtype="int8x64"))

    @T.prim_func(s_tir=True)
    def main(w_scale: T.Buffer((64, 64), "float32"), x_scale: T.Buffer((64, rows), "float32"),
             out: T.Buffer((threads, rows * 64), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            with T.sblock("ceiling"):
                acc = T.sblock_alloc_buffer((rows * 64,), "float32", scope="local")
                dots = T.sblock_alloc_buffer((rows * 64,), "int32", scope="local")
                for c in T.vectorized(rows * 64):
                    acc[c] = T.float32(0)
                for g in range(iters):
                    for c in T.vectorized(rows * 64):
                        dots[c] = T.Cast("int32", g) + c  # varies by group, as the real dot products do
                    for step in T.unroll(steps):
                        for lane in T.unroll(lanes):
                            for i in T.unroll(rows):
                                dots[T.ramp(i * 64 + lane * 16, 1, 16)] = dot(
                                    dots.vload([i * 64 + lane * 16], "int32x16"), step)
                    for i in T.unroll(rows):
                        for c in T.vectorized(64):
                            acc[i * 64 + c] = acc[i * 64 + c] + T.Cast("float32", dots[i * 64 + c]) * (
                                w_scale[g % 64, c] * x_scale[g % 64, i])
                for c in T.vectorized(rows * 64):
                    out[t, c] = acc[c]

    args = [tvm.runtime.tensor(np.ones((64, 64), np.float32)), tvm.runtime.tensor(np.ones((64, rows), np.float32)),
            tvm.runtime.empty((threads, rows * 64), "float32")]
    return rate(main, args, threads * iters * rows * lanes * steps * 128)


def clock_ghz() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return max(mhz) / 1e3 if mhz else float("nan")


def old_module(rev: str, path: str, name: str):
    """A kernel module as it was at git revision rev, imported beside this tree's."""
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode:  # a revision from before the folder was named tir_kernels/
        shown = subprocess.run(["git", "show", f"{rev}:{path.replace('tir_kernels/', 'kernels/')}"],
                               capture_output=True, text=True, check=True)
    source = shown.stdout
    source = source.replace("from .common import", "from gptj_tvm.tir_kernels.common import")
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())


def gemm_rows(args, threads: int, peaks: dict, bandwidth: float) -> list[dict]:
    rng = np.random.default_rng(0)
    old_pairs = old_module(args.old_kernels, "tir_kernels/pair_gemm.py", "old_pair_gemm")
    old_vnni = old_module(args.old_kernels, "tir_kernels/vnni_gemm.py", "old_vnni_gemm")
    rows_out = []
    for gemm, (k, n) in GEMMS.items():
        for fmt in args.formats:
            if fmt == "bfloat16":
                weight = tvm.runtime.tensor(paired(rng.standard_normal((k, n), dtype=np.float32)
                                                   .astype(ml_dtypes.bfloat16)))
                tile = pair_tile(k, n)
                libs = {"old": build(old_pairs.pair_matmul(k, n, tile, "bfloat16")),
                        "new": build(pair_gemm.pair_matmul(k, n, tile, "bfloat16", dot=has_avx512_bf16()))}
                weight_bytes, peak = 2 * k * n, peaks["vdpbf16ps" if has_avx512_bf16() else "fma"]
            else:
                levels = rng.integers(-7, 8, size=(k, n)).astype(np.int8)
                weight = [tvm.runtime.tensor(quant.pack(levels, fmt)),
                          tvm.runtime.tensor(quant.tiled(rng.uniform(0.5, 2, (k // 32, n)).astype(np.float16)))]
                spec = (k, n, fmt, quant.GROUP, quant.TILE, quant.OFFSET[fmt])
                libs = {"old": build(old_vnni.vnni_matmul(*spec)), "new": build(vnni_gemm.vnni_matmul(*spec))}
                weight_bytes = k * n * (1 if fmt == "q8" else 0.5) + k * n // 32 * 2
                peak = peaks["vpdpbusd"]
            for rows in ROWS:
                if fmt == "bfloat16":
                    inputs = [tvm.runtime.tensor(rng.standard_normal((1, rows, k), dtype=np.float32)
                                                 .astype(ml_dtypes.bfloat16)), weight]
                else:
                    inputs = [tvm.runtime.tensor(rng.integers(-127, 128, (1, rows, k)).astype(np.int8)),
                              tvm.runtime.tensor(rng.uniform(0.1, 1, (1, rows, k // 32)).astype(np.float32)),
                              tvm.runtime.tensor(np.zeros((1, rows, k // 32), np.int32)), *weight]
                out = tvm.runtime.empty((1, rows, n), "float32")
                repeats = max(1, int(2e9 / (2 * k * n * rows)))  # about 2 GFLOP a sample
                times = time_kernels(libs, inputs, out, args.rounds, repeats)
                flop = 2 * k * n * rows
                row = {"gemm": gemm, "format": fmt, "k": k, "n": n, "rows": rows,
                       "read_bound_ms": 1e3 * weight_bytes / bandwidth, "arithmetic_bound_ms": 1e3 * flop / peak}
                for name in ("old", "new"):
                    ms = 1e3 * float(np.median(times[name]))
                    row[f"{name}_ms"], row[f"{name}_gflops"] = ms, flop / ms / 1e6
                row["new_share_of_peak"] = row["new_gflops"] * 1e9 / peak
                if "group_ceiling" in peaks and fmt != "bfloat16":
                    row["new_share_of_group_ceiling"] = row["new_gflops"] * 1e9 / peaks["group_ceiling"]
                row["new_x_bound"] = row["new_ms"] / max(row["read_bound_ms"], row["arithmetic_bound_ms"])
                rows_out.append(row)
                print(f"{gemm:8s} {fmt:8s} {rows:4d} rows: old {row['old_ms']:8.2f} ms ({row['old_gflops']:4.0f} "
                      f"GFLOP/s)  new {row['new_ms']:8.2f} ms ({row['new_gflops']:4.0f}, "
                      f"{100 * row['new_share_of_peak']:.0f}% of peak"
                      + (f", {100 * row['new_share_of_group_ceiling']:.0f}% of the group ceiling"
                         if "new_share_of_group_ceiling" in row else "")
                      + f")  bounds: read {row['read_bound_ms']:.2f}, arithmetic {row['arithmetic_bound_ms']:.2f} ms "
                      f"-> {row['new_x_bound']:.2f}x", flush=True)
    return rows_out


LENGTHS = (128, 512)


def time_prefills(gen) -> dict[int, float]:
    """Seconds to prefill a prompt of each length (the time to the first token's logits)."""
    seconds = {}
    gen.forward("prefill", list(range(1, 9)), gen.new_cache(9), 8)  # the first call's one-time costs
    for length in LENGTHS:
        prompt = [(7919 * i + 13) % 50000 for i in range(length)]
        start = time.perf_counter()
        gen.forward("prefill", prompt, gen.new_cache(length + 1), length)
        seconds[length] = time.perf_counter() - start
    return seconds


def prefill_rounds(old: str, new: str, rounds: int) -> dict:
    """Both artifacts in this process where memory holds them, round by round; else each round loads each in
    a process of its own (two bfloat16 6Bs are 24 GB)."""
    folders = {"old": old, "new": new}
    weights = sum(gptj_tvm.runtime.artifact.ArtifactMetadata.read(f).weight_bytes for f in folders.values())
    in_process = weights < 0.7 * __import__("psutil").virtual_memory().available
    gens = {name: gptj_tvm.load(folder) for name, folder in folders.items()} if in_process else {}
    times = {"old": {n: [] for n in LENGTHS}, "new": {n: [] for n in LENGTHS}}
    for _ in range(rounds):
        for name, folder in folders.items():
            if in_process:
                seconds = time_prefills(gens[name])
            else:
                worker = run_json([sys.executable, __file__, "--prefill-worker", folder], what=f"{folder}'s prefill")
                seconds = {int(k): v for k, v in worker.items()}
            for length in LENGTHS:
                times[name][length].append(seconds[length])
    result = {"one_process": in_process}
    for length in LENGTHS:
        for name in folders:
            seconds = float(np.median(times[name][length]))
            result[f"{name}_prefill_{length}_s"] = seconds
            result[f"{name}_prefill_{length}_tokens_per_s"] = length / seconds
        result[f"speedup_{length}"] = result[f"old_prefill_{length}_s"] / result[f"new_prefill_{length}_s"]
        print(f"  prefill {length}: old {result[f'old_prefill_{length}_s']:.1f} s, new "
              f"{result[f'new_prefill_{length}_s']:.1f} s (time to first token), "
              f"{result[f'speedup_{length}']:.2f}x", flush=True)
    return result


TRANSFORMERS_PREFILL = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
out = {}
for n in (128, 512):
    ids = torch.tensor([[(7919 * i + 13) % 50000 for i in range(n)]])
    with torch.no_grad():
        model(ids[:, :8])
        start = time.perf_counter()
        model(ids)
        out[f"prefill_{n}_s"] = time.perf_counter() - start
print(json.dumps(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-kernels", default="d511a48", help="git revision of the old kernels")
    parser.add_argument("--formats", default="bfloat16,q8,q4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--artifacts", nargs="*", default=[], metavar="DIR",
                        help="pairs OLD NEW of artifacts of one model: prefill of 128 and 512 tokens")
    parser.add_argument("--transformers", metavar="CHECKPOINT_DIR", help="transformers' bfloat16 prefill too")
    parser.add_argument("--no-gemms", action="store_true", help="skip the GEMM table (peaks and models only)")
    parser.add_argument("--prefill-worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/prefill.json")
    args = parser.parse_args(argv)
    if args.prefill_worker:  # one round of one artifact, for prefill_rounds
        print(json.dumps(time_prefills(gptj_tvm.load(args.prefill_worker))))
        return 0
    args.formats = args.formats.split(",")
    threads = int(__import__("os").environ["TVM_NUM_THREADS"])
    peaks = {kind: peak_kernel(kind, threads) for kind in ("fma", "vdpbf16ps", "vpdpbusd")
             if kind == "fma" or (kind == "vdpbf16ps" and has_avx512_bf16()) or (kind == "vpdpbusd" and has_vnni())}
    ghz = clock_ghz()
    print(f"{cpu_model()}, {threads} threads, clock {ghz:.2f} GHz (/proc/cpuinfo)")
    for kind, rate in peaks.items():
        print(f"  peak {kind:10s} {rate / 1e9:6.0f} G(FL)OP/s = {threads} threads x {ghz:.2f} GHz x "
              f"{rate / threads / ghz / 1e9:.0f} per cycle (measured: 12 chains per thread)")
    if has_vnni():
        peaks["group_ceiling"] = group_ceiling(threads)
        ceiling_s = {n: n * PREFILL_OPS_PER_TOKEN / peaks["group_ceiling"] for n in LENGTHS}
        print(f"  q8/q4 group ceiling {peaks['group_ceiling'] / 1e9:.0f} GOP/s "
              f"({100 * peaks['group_ceiling'] / peaks['vpdpbusd']:.0f}% of vpdpbusd's peak: a group's "
              f"{quant.GROUP // 4} vpdpbusd with its conversion, scale multiply and FMA, operands in registers); "
              "the 6B's prefill GEMMs at this rate alone take " +
              ", ".join(f"{ceiling_s[n]:.1f} s for {n} tokens" for n in LENGTHS))
    bandwidth = read_bandwidth() or float("nan")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    result = {"cpu": cpu_model(), "threads": threads, "clock_ghz": ghz,
              "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()}, "read_bandwidth_gb_s": bandwidth / 1e9,
              "prefill_gemm_ops_per_token": PREFILL_OPS_PER_TOKEN,
              "gemms": [] if args.no_gemms else gemm_rows(args, threads, peaks, bandwidth), "models": []}
    for old, new in zip(args.artifacts[::2], args.artifacts[1::2]):
        print(f"{old} (old kernels) vs {new} (new), {args.rounds} rounds interleaved:")
        result["models"].append({"old": old, "new": new, **prefill_rounds(old, new, args.rounds)})
    if args.transformers:
        try:
            result["transformers"] = run_json([sys.executable, "-c", TRANSFORMERS_PREFILL, args.transformers, threads],
                                              what="transformers")
            print("transformers bfloat16: " + ", ".join(f"prefill {n}: {result['transformers'][f'prefill_{n}_s']:.1f} s"
                                                       for n in (128, 512)))
        except GptjError as err:
            print(err)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
