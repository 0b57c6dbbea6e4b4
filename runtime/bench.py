"""`gptj-tvm bench`: how fast an artifact runs here, next to what memory bandwidth allows. TVM runtime only.

Prefill tokens/s for 128- and 512-token prompts, decode ms/token at context 128 and 1024, load time, peak RSS
(after loading, and over the whole run) and weight bytes. A decode step reads every weight once, so weight bytes / read bandwidth is its bound (the
bandwidth is measured by the caller, in another process, so that its buffer does not count in the peak RSS).
Decode at a context is timed on a KV cache holding that many positions: at 128 after a real prefill, at 1024
on a zeroed cache (a step's work does not depend on the cached values, and prefilling 1023 tokens of the 6B
model here would take minutes).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tvm
from tqdm import tqdm

from .engine import Generator
from .profiler import record_calls, summarize

PREFILLS = (128, 512)
CONTEXTS = (128, 1024)
DECODE_STEPS = 8


def prompt(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % vocab for i in range(n)]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_bench(folder, bandwidth: float | None, progress: bool = True) -> dict:
    folder = Path(folder)
    start = time.perf_counter()
    gen = Generator.load(folder)
    result = {"artifact": str(folder), "dtype": gen.meta["dtype"], "quantization": gen.meta.get("quantization"),
              "target": gen.meta["target"], "load_s": time.perf_counter() - start,
              "peak_rss_after_load_bytes": peak_rss_bytes(),
              "weight_bytes": sum(info["bytes"] for info in gen.meta["weight_files"].values())}
    prefills = [n for n in PREFILLS if n <= gen.context]
    contexts = [n for n in CONTEXTS if n <= gen.context]
    with tqdm(total=len(prefills) + len(contexts), desc="bench", disable=not progress, leave=False) as bar:
        for n in prefills:
            ids = prompt(n, gen.vocab_size)
            seconds = min(_timed(lambda: gen.forward("prefill", ids, gen.new_cache(n), n)) for _ in range(2))
            result[f"prefill_{n}_tokens_per_s"] = n / seconds
            bar.update()
        for context in contexts:
            cache = _cache_at(gen, context)
            ids = prompt(DECODE_STEPS + 2, gen.vocab_size)
            times = [_timed(lambda i=i, cache=cache: gen.forward("decode", [ids[i]], cache, context + i))
                     for i in range(min(DECODE_STEPS + 2, gen.context - context + 1))]
            result[f"decode_{context}_ms"] = 1e3 * float(np.median(times[2:] or times))
            # where a decode step's time goes, kernel by kernel
            tokens = tvm.runtime.tensor(np.asarray([[ids[0]]], dtype=np.int32), gen.device)
            total = min(context + len(times), int(cache[0].shape[0]))  # never past the cache
            _, calls = record_calls(gen._vm, "decode", tokens, cache, tvm.runtime.ShapeTuple([total]),
                                    gen._params)
            result[f"decode_{context}_kernels"] = summarize(calls)
            del cache
            bar.update()
    result["peak_rss_bytes"] = peak_rss_bytes()
    if bandwidth:
        add_bound(result, bandwidth)
    return result


def add_bound(result: dict, bandwidth: float, samples: list[float] | None = None) -> None:
    """The decode bound (weight bytes / read bandwidth) and each decode time as a multiple of it; `samples`:
    every bandwidth read (bytes/s) `bandwidth` was chosen from, kept to show how much the machine moved."""
    result["read_bandwidth_gb_s"] = bandwidth / 1e9
    if samples:
        result["read_bandwidth_samples_gb_s"] = [sample / 1e9 for sample in samples]
    result["bound_ms"] = 1e3 * result["weight_bytes"] / bandwidth
    for key in [k for k in result if k.startswith("decode_") and k.endswith("_ms")]:
        result[key.replace("_ms", "_x_bound")] = result[key] / result["bound_ms"]


def _cache_at(gen: Generator, context: int):
    """A cache holding context - 1 positions, ready for the decode step that makes it context."""
    cache = gen.new_cache(min(context + DECODE_STEPS + 2, gen.context))
    if context <= max(PREFILLS):
        gen.forward("prefill", prompt(context - 1, gen.vocab_size), cache, context - 1)
        return cache
    dtype = ml_dtypes.bfloat16 if gen.meta["dtype"] == "bfloat16" else gen.meta["dtype"]
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
    if "bound_ms" in result:
        rows.append(("bound (weights / read bandwidth)",
                     f"{result['bound_ms']:.1f} ms/token at {result['read_bandwidth_gb_s']:.1f} GB/s"
                     + (" (reads before and after the runs: "
                        + ", ".join(f"{b:.1f}" for b in result["read_bandwidth_samples_gb_s"]) + ")"
                        if "read_bandwidth_samples_gb_s" in result else "")))
    for key, value in result.items():
        if key.startswith("prefill_"):
            rows.append((f"prefill, {key.split('_')[1]}-token prompt", f"{value:.1f} tokens/s"))
        elif key.startswith("decode_") and key.endswith("_ms"):
            context = key.split("_")[1]
            bound = result.get(f"decode_{context}_x_bound")
            rows.append((f"decode, context {context}",
                         f"{value:.1f} ms/token" + (f" ({bound:.2f}x the bound)" if bound else "")))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:{width}s}  {value}" for name, value in rows]
    for key in [k for k in result if k.endswith("_kernels")]:
        lines.append(f"one decode step at context {key.split('_')[1]}, by kernel (calls, ms; the instrument "
                     "hook adds a little to each):")
        lines += [f"  {row['name']:44s} {row['calls']:4d} {row['total_ms']:9.2f}" for row in result[key][:8]]
    return "\n".join(lines)

