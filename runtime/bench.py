"""`gptj-tvm bench`: how fast an artifact runs here, next to what memory bandwidth allows. TVM runtime only.

Prefill tokens/s for 128- and 512-token prompts, decode ms/token at context 128 and 1024, load time, peak RSS
(after loading, and over the whole run) and weight bytes. A decode step is bound by the bytes it reads: every
weight its kernels take, one row of the tables indexed by token or position (the embedding, the rotary
angles), and the KV cache up to the context; `StepReads` counts them kernel by kernel from the arguments of a
real step, so each kernel has its own bound too. The read bandwidth is measured in a child process (its buffer
stays out of the peak RSS), before and after the runs, and the best read is the bound's denominator.
Decode at a context is timed on a KV cache holding that many positions: at 128 after a real prefill, at 1024
on a zeroed cache (a step's work does not depend on the cached values, and prefilling 1023 tokens of the 6B
model here would take minutes).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from gptj_tvm.core.child import run_json
from gptj_tvm.core.errors import GptjError

from .model import Model

PREFILLS = (128, 512)
CONTEXTS = (128, 1024)
DECODE_STEPS = 8
# Parameters a step reads one row of per token: the embedding by token id, the rotary tables by position.
ROW_TABLES = ("wte", "rotary.cos", "rotary.sin")
# Kernels that take the KV cache to write the new position (frontend/model.py's rotary_append); the others
# that take it (attention) read it up to the context.
CACHE_WRITERS = ("rotary_append",)


def prompt(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % vocab for i in range(n)]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def read_bandwidth(gib: float = 4.0, repeats: int = 10) -> float | None:
    """Read bandwidth with every thread (bytes/s), measured in a child process so that its buffer stays out of
    this one's RSS; None where this TVM has no compiler to build the probe's kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}  # it compiles its kernel
    try:
        probe = run_json([sys.executable, "-m", "gptj_tvm.targets.bandwidth", "--json", "--gib", gib,
                          "--repeats", repeats], env=env)
    except GptjError:
        return None
    return float(probe["read_bandwidth"])


def tensor_bytes(tensor) -> int:
    bits = 8 if str(tensor.dtype) == "bool" else int(re.search(r"(\d+)$", str(tensor.dtype)).group(1))
    return int(np.prod([int(s) for s in tensor.shape])) * bits // 8


class StepReads:
    """The bytes each kernel of a decode step reads, from the tensors it is called with: a weight whole, a
    ROW_TABLES parameter one row, a KV cache tensor up to `positions` unless the kernel only writes it."""

    def __init__(self, gen: Model, cache, positions: int):
        self.params = {t.data_ptr(): (name, t) for name, t in gen.weights.items()}
        self.cache = {t.data_ptr(): t for t in cache}
        self.positions = positions

    def __call__(self, symbol: str, args) -> int:
        if symbol.startswith("vm.builtin."):  # the VM's own bookkeeping (shape checks, allocation) reads no data
            return 0
        total = 0
        for arg in args:
            pointer = getattr(arg, "data_ptr", None)
            if pointer is None:
                continue
            if pointer() in self.params:
                name, tensor = self.params[pointer()]
                whole = tensor_bytes(tensor)
                total += whole // int(tensor.shape[0]) if name in ROW_TABLES else whole
            elif pointer() in self.cache and symbol not in CACHE_WRITERS:
                tensor = self.cache[pointer()]
                total += tensor_bytes(tensor) // int(tensor.shape[0]) * self.positions
        return total


def profile_decode(gen: Model, cache, token: int, total: int) -> list[dict]:
    """One decode step (the cache then holds `total` tokens) with the kernel profiler: per kernel, its calls,
    milliseconds and bytes read, slowest first."""
    calls = gen.profile("decode", [token], cache, total, measure=StepReads(gen, cache, total))
    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "total_ms": 0.0, "read_bytes": 0})
    for symbol, seconds, read in calls:
        row = rows[symbol]
        row["calls"] += 1
        row["total_ms"] += 1e3 * seconds
        row["read_bytes"] += read
    return sorted(({"name": name, **row} for name, row in rows.items()), key=lambda row: -row["total_ms"])


def run_bench(folder, progress: bool = True) -> dict:
    folder = Path(folder)
    start = time.perf_counter()
    gen = Model.load(folder)
    result = {"artifact": str(folder), "dtype": gen.meta.dtype, "quantization": gen.meta.quantization,
              "target": gen.meta.target, "load_s": time.perf_counter() - start,
              "peak_rss_after_load_bytes": peak_rss_bytes(),
              "weight_bytes": gen.meta.weight_bytes}
    prefills = [n for n in PREFILLS if n <= gen.context]
    contexts = [n for n in CONTEXTS if n <= gen.context]
    with tqdm(total=len(prefills) + len(contexts), desc="bench", disable=not progress, leave=False) as bar:
        for n in prefills:
            result[f"prefill_{n}_tokens_per_s"] = n / time_prefill(gen, n)
            bar.update()
        for context in contexts:
            cache = cache_at(gen, context)
            ids = prompt(DECODE_STEPS + 2, gen.vocab_size)
            times = [_timed(lambda i=i, cache=cache: gen.forward("decode", [ids[i]], cache, context + i))
                     for i in range(min(DECODE_STEPS + 2, gen.context - context + 1))]
            result[f"decode_{context}_ms"] = 1e3 * float(np.median(times[2:] or times))
            # where a decode step's time goes and what it reads, kernel by kernel
            total = min(context + len(times), int(cache[0].shape[0]))  # never past the cache
            kernels = profile_decode(gen, cache, ids[0], total)
            result[f"decode_{context}_kernels"] = kernels
            result[f"decode_{context}_read_bytes"] = sum(row["read_bytes"] for row in kernels)
            del cache
            bar.update()
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def bench_with_bound(folder, bandwidth: bool = True, progress: bool = True) -> dict:
    """run_bench, and with `bandwidth` the bound: the read bandwidth measured before and after the runs, the
    best of the two (other tenants of a machine come and go). No bound where this TVM has no compiler."""
    first = read_bandwidth() if bandwidth else None
    result = run_bench(folder, progress=progress)
    if first is not None:
        samples = [b for b in (first, read_bandwidth()) if b]
        add_bound(result, max(samples), samples)
    return result


NO_BOUND = "(no bound: the bandwidth is measured with a TVM-compiled kernel, and this TVM has no compiler)"


def add_bound(result: dict, bandwidth: float, samples: list[float] | None = None) -> None:
    """Each decode's bound (the bytes its step reads / read bandwidth) and its time as a multiple of it, per
    kernel too; `samples`: every bandwidth read (bytes/s) `bandwidth` was chosen from, kept to show how much the
    machine moved."""
    result["read_bandwidth_gb_s"] = bandwidth / 1e9
    if samples:
        result["read_bandwidth_samples_gb_s"] = [sample / 1e9 for sample in samples]
    for context in [k.split("_")[1] for k in result if k.startswith("decode_") and k.endswith("_read_bytes")]:
        bound_ms = 1e3 * result[f"decode_{context}_read_bytes"] / bandwidth
        result[f"decode_{context}_bound_ms"] = bound_ms
        result[f"decode_{context}_x_bound"] = result[f"decode_{context}_ms"] / bound_ms
        for row in result[f"decode_{context}_kernels"]:
            row["bound_ms"] = 1e3 * row["read_bytes"] / bandwidth
            row["x_bound"] = row["total_ms"] / row["bound_ms"] if row["read_bytes"] else None


def time_prefill(gen: Model, n: int) -> float:
    """Seconds of an n-token prefill into a fresh cache, the best of two."""
    ids = prompt(n, gen.vocab_size)
    return min(_timed(lambda: gen.forward("prefill", ids, gen.new_cache(n), n)) for _ in range(2))


def cache_at(gen: Model, context: int, steps: int = DECODE_STEPS + 2):
    """A cache holding context - 1 positions, with room for `steps` decode steps from there."""
    cache = gen.new_cache(min(context + steps, gen.context))
    if context <= max(PREFILLS):
        gen.forward("prefill", prompt(context - 1, gen.vocab_size), cache, context - 1)
        return cache
    dtype = ml_dtypes.bfloat16 if gen.meta.dtype == "bfloat16" else gen.meta.dtype
    zeros = np.zeros(tuple(int(s) for s in cache[0].shape), dtype=dtype)
    for tensor in cache:
        tensor.copyfrom(zeros)
    return cache


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(result: dict) -> str:
    rows = [("load", f"{result['load_s']:.1f} s"), ("weights", f"{result['weight_bytes'] / 1e9:.2f} GB"),
            ("peak RSS after load", f"{result['peak_rss_after_load_bytes'] / 1e9:.2f} GB"),
            ("peak RSS", f"{result['peak_rss_bytes'] / 1e9:.2f} GB")]
    if "read_bandwidth_gb_s" in result:
        rows.append(("read bandwidth", f"{result['read_bandwidth_gb_s']:.1f} GB/s" + (
            " (best of the reads before and after the runs: "
            + ", ".join(f"{b:.1f}" for b in result["read_bandwidth_samples_gb_s"]) + ")"
            if "read_bandwidth_samples_gb_s" in result else "")))
    for key, value in result.items():
        if key.startswith("prefill_"):
            rows.append((f"prefill, {key.split('_')[1]}-token prompt", f"{value:.1f} tokens/s"))
        elif key.startswith("decode_") and key.endswith("_ms") and not key.endswith("bound_ms"):
            context = key.split("_")[1]
            text = f"{value:.1f} ms/token, reads {result[f'decode_{context}_read_bytes'] / 1e9:.3f} GB"
            if f"decode_{context}_bound_ms" in result:
                text += (f"; bound {result[f'decode_{context}_bound_ms']:.1f} ms "
                         f"({result[f'decode_{context}_x_bound']:.2f}x the bound)")
            rows.append((f"decode, context {context}", text))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:{width}s}  {value}" for name, value in rows]
    for key in [k for k in result if k.endswith("_kernels")]:
        lines.append(f"one decode step at context {key.split('_')[1]}, by kernel (calls, ms, MB read, x its bound; "
                     "the instrument hook adds a little to each):")
        for row in result[key][:8]:
            ratio = f"{row['x_bound']:6.2f}" if row.get("x_bound") is not None else ""
            lines.append(f"  {row['name']:44s} {row['calls']:4d} {row['total_ms']:9.2f} "
                         f"{row['read_bytes'] / 1e6:9.2f} {ratio}")
    return "\n".join(lines)
