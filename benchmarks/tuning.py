"""Tuned vs default schedules for GPT-J-6B's decode GEMVs (d 4096, d_ff 16384, bfloat16), next to the bound.

    python benchmarks/tuning.py [--trials 64] [--db benchmarks/results/tuning-db.json]

Per kernel (W_in = [q|k|v|fc_in], W_out = [out_proj; fc_out], lm_head): dlight's CPU rules (GEMV, Reduction;
none of them takes an [in, out] GEMV, so the kernel runs as legalized), this project's default rule, the
MetaSchedule-tuned schedule, and what `compile --tuning-db` runs (tuned where it beat the default), each timed
alone with TVM's time_evaluator, next to its bound (bytes read / read bandwidth measured in the same run with
every core); and the hand-written GEMV on the same weight in column pairs (tir_kernels/pair_gemm.py), what a
bfloat16 CPU artifact runs without a tuning database. Then one decode block: the tuned GEMVs plus the
block's other kernels (LayerNorm, rotary + append, attention at context 128), against numpy doing the same
block in float32 with its BLAS. Tuning resumes from --db. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tvm
from gptj_tvm.targets.bandwidth import read_bandwidth
from tvm.s_tir import dlight as dl

from gptj_tvm.frontend.layouts.column_pairs import pair_tile
from gptj_tvm.tir_kernels.pair_gemm import pair_matmul
from gptj_tvm.frontend.random_checkpoint import make_config
from gptj_tvm.ir import pipeline
from gptj_tvm.schedules.cpu_matmul import CPUMatmul
from gptj_tvm.schedules.database import TuningDatabase
from gptj_tvm.schedules.measure import random_args, time_ms
from gptj_tvm.schedules.tune import gemm_tasks, tune
from gptj_tvm.compiler.build import export_model
from gptj_tvm.targets.llvm import host_target
from gptj_tvm.targets.resolve import tuning_fingerprint

from report import write_result  # benchmarks/report.py (a script's folder is on its path)


CONTEXT = 128


def bytes_read(func) -> int:
    """Bytes of the kernel's static-shaped inputs (the weights, their bias, the input vector)."""
    total = 0
    for param in func.params[:-1]:  # the last parameter is the output
        shape = getattr(param.ty, "shape", None)
        if shape is not None and all(isinstance(s, tvm.tirx.IntImm) for s in shape):
            total += int(np.prod([int(s) for s in shape])) * tvm.runtime.DataType(str(param.ty.dtype)).bits // 8
    return total


def pairs_ms(func, target, rng) -> float:
    """The pair-layout GEMV (with its bias) on the weight of a column-tile GEMV kernel [N / t, K, t]."""
    shapes = [[int(s) for s in p.ty.shape] for p in func.params if len(getattr(p.ty, "shape", ())) == 3
              and all(isinstance(s, tvm.tirx.IntImm) for s in p.ty.shape)]
    weight = max(shapes, key=np.prod)  # the input vector [1, 1, K] and the output are 3-D too
    k, n = weight[1], weight[0] * weight[2]
    pairs = pair_matmul(k, n, pair_tile(k, n), "bfloat16", bias=True)
    return time_ms(pairs, target, random_args(pairs, rng))


def schedule_with(func, target, rules):
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": func}))
    return mod["main"]


def numpy_block_ms(d: int, ff: int, heads: int, repeats: int = 5) -> float:
    """The same decode block in numpy float32 (its BLAS, every thread): LN, W_in, attention, gelu, W_out."""
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((d, 3 * d + ff), dtype=np.float32)
    w_out = rng.standard_normal((d + ff, d), dtype=np.float32)
    b_in, b_out = np.zeros(3 * d + ff, np.float32), np.zeros(d, np.float32)
    keys = rng.standard_normal((CONTEXT, heads, d // heads), dtype=np.float32)
    values = rng.standard_normal((CONTEXT, heads, d // heads), dtype=np.float32)
    h = rng.standard_normal((1, d), dtype=np.float32)

    def block():
        x = (h - h.mean()) / np.sqrt(h.var() + 1e-5)
        y = x @ w_in + b_in
        q = y[0, :d].reshape(heads, -1)
        scores = np.einsum("hd,lhd->hl", q, keys) / np.sqrt(d // heads)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        a = np.einsum("hl,lhd->hd", p / p.sum(-1, keepdims=True), values).reshape(1, d)
        f = y[:, 3 * d:]
        g = 0.5 * f * (1 + np.tanh(0.7978845608 * (f + 0.044715 * f ** 3)))
        return np.concatenate([a, g], axis=1) @ w_out + b_out + h

    block()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--db", default="benchmarks/results/tuning-db.json")
    parser.add_argument("--out", default="benchmarks/results/tuning.json")
    args = parser.parse_args(argv)
    config = make_config("gptj-6b", 1, "bfloat16")
    target = host_target()
    mod = pipeline.optimize(export_model(config, "bfloat16")[0], target)
    tasks = gemm_tasks(mod, target)  # decode only: prefill buckets are left to `gptj-tvm tune`
    start = time.perf_counter()
    summary = tune(mod, target, tuning_fingerprint(target, "bfloat16"), Path(args.db), trials=args.trials)
    tuning_s = time.perf_counter() - start
    db = TuningDatabase.open(args.db, tuning_fingerprint(target, "bfloat16"), create=False)
    memory_db = db.to_memory_database()
    bandwidth = read_bandwidth()
    rng = np.random.default_rng(0)
    rows = []
    for task in tasks:
        inputs = random_args(task.func, rng, scalar=CONTEXT)
        tuned = memory_db.query_schedule(task.module(), target, workload_name="main")
        rows.append({
            "kernel": task.name,
            "bytes_read": bytes_read(task.func),
            "bound_ms": 1e3 * bytes_read(task.func) / bandwidth,
            "dlight_ms": time_ms(schedule_with(task.func, target, [dl.cpu.GEMV(), dl.cpu.Reduction()]), target,
                                 inputs),
            "default_ms": time_ms(schedule_with(task.func, target, [CPUMatmul()]), target, inputs),
            "tuned_ms": time_ms(tuned.mod["main"], target, inputs) if tuned else None,
            "trials": db.records.get(task.key, {}).get("trials"),
            # MetaSchedule's best as measured while tuning (the database keeps it either way)
            "search_best_ms": db.records.get(task.key, {}).get("latency_us", float("nan")) / 1e3,
        })
        # what `compile --tuning-db` runs: the tuned schedule where it beat the default, else the default
        rows[-1]["compiled_ms"] = rows[-1]["tuned_ms"] or rows[-1]["default_ms"]
        rows[-1]["pairs_ms"] = pairs_ms(task.func, target, rng)
    others = {}
    for name in dict.fromkeys(pipeline.kernel_calls(mod, "decode")):
        if name in ("rotary_append", "attention") or name.startswith("fused_layer_norm"):
            # one new token (n = 1) at position CONTEXT - 1 of a cache holding CONTEXT positions
            others[name] = time_ms(mod[name], target, random_args(mod[name], rng, scalar=CONTEXT,
                                                                  sizes={"capacity": CONTEXT}))
    lm_head = [t.name for t in tasks if int(t.func.params[-1].ty.shape[-1]) == config.padded_vocab_size]
    tuned_block = sum(r["compiled_ms"] for r in rows if r["kernel"] not in lm_head)
    tuned_block += sum(others.values())
    result = {
        "threads": os.environ["TVM_NUM_THREADS"], "read_bandwidth_gb_s": bandwidth / 1e9, "trials": args.trials,
        "tuning_seconds": tuning_s, "tuning_summary": summary, "kernels": rows, "other_block_kernels_ms": others,
        "tuned_block_ms": tuned_block, "numpy_float32_block_ms": numpy_block_ms(config.n_embd, config.d_ff,
                                                                                 config.n_head),
    }
    print(f"GPT-J-6B decode GEMVs, bfloat16, {result['threads']} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s;"
          f" tuning {tuning_s:.0f} s for {summary['tuned']} tasks ({summary['resumed']} resumed), "
          f"{args.trials} trials per task on average")
    print("ms per call; search best: MetaSchedule's fastest candidate while tuning; tuned: its record where it "
          "beat the default; compiled: what compile --tuning-db runs; pairs: the column-pair GEMV (no database)")
    print(f"{'kernel':40s} {'MB':>5s} {'bound':>7s} {'dlight':>8s} {'default':>8s} {'search':>8s} {'tuned':>8s} "
          f"{'compiled':>8s} {'/bound':>6s} {'pairs':>8s} {'/bound':>6s}")
    for r in rows:
        tuned = f"{r['tuned_ms']:8.2f}" if r["tuned_ms"] else "       -"
        print(f"{r['kernel']:40s} {r['bytes_read'] / 1e6:5.0f} {r['bound_ms']:7.2f} {r['dlight_ms']:8.2f} "
              f"{r['default_ms']:8.2f} {r['search_best_ms']:8.2f} {tuned} {r['compiled_ms']:8.2f} "
              f"{r['compiled_ms'] / r['bound_ms']:6.2f} {r['pairs_ms']:8.2f} {r['pairs_ms'] / r['bound_ms']:6.2f}")
    print("other block kernels (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in others.items()))
    print(f"one decode block: tuned {tuned_block:.2f} ms, numpy float32 + BLAS "
          f"{result['numpy_float32_block_ms']:.2f} ms")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
