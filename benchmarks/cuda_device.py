"""On a GPU machine, with TVM's runtime only: CUDA artifacts against the numpy GPT-J, and GPT-J-6B's speed.

    PYTHONPATH=.device/site TVM_USE_RUNTIME_LIB=1 python3 benchmarks/cuda_device.py --bundle .device --out OUT

Needs the bundle of benchmarks/cuda_bundle.py (library-only float16 artifacts for the GPU's arch, TVM's runtime).
For each model it writes the random checkpoint here (init-random, the same seed and config as the artifact's)
and adds its weights (convert-weights), then:
  tiny, full4   logits of a 12-token prompt against tests/reference.py (float64 numpy GPT-J): relative max error
                below 2e-2 (float16), and 16 greedy tokens equal to the reference's greedy tokens
  gptj-6b       decode ms/token at context 128 and 1024, prefill tokens/s for a 512-token prompt, next to the
                bound: weight bytes / the GPU's read bandwidth, measured in the same run (a float16 sum over
                4 GiB with PyTorch, which that machine has; TVM's runtime alone cannot compile a kernel)
Prints a table and writes OUT/cuda_device.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import gptj_tvm
from gptj_tvm.frontend.random_checkpoint import make_config, write_random_checkpoint
from gptj_tvm.compiler.convert import convert_weights

PROMPT = [464, 10730, 29598, 11, 290, 262, 2068, 7586, 21831, 3, 99, 12000]
MODELS = {"tiny": ("tiny", None), "full4": ("gptj-6b", 4), "gptj-6b": ("gptj-6b", None)}


def prepare(bundle: Path, work: Path, name: str) -> Path:
    preset, layers = MODELS[name]
    checkpoint, folder = work / f"{name}-checkpoint", work / name
    write_random_checkpoint(checkpoint, make_config(preset, layers, "float16"), seed=0)
    shutil.copytree(bundle / name, folder)
    start = time.perf_counter()
    convert_weights(checkpoint, folder, progress=False)
    print(f"{name}: weights converted in {time.perf_counter() - start:.1f} s", flush=True)
    return checkpoint, folder


def check_against_reference(checkpoint: Path, folder: Path) -> dict:
    from reference import ReferenceGPTJ, rel_max_error

    gen = gptj_tvm.load(folder)
    ref = ReferenceGPTJ(checkpoint)
    ids = [i % gen.vocab_size for i in PROMPT]
    error = rel_max_error(gen.logits(ids), ref.logits(ids))
    ours = gen.generate(ids[:6], max_new_tokens=16, temperature=0).ids
    theirs = ref.greedy(ids[:6], 16)
    return {"rel_max_error": float(error), "error_ok": bool(error < 2e-2), "greedy_ids": ours,
            "reference_greedy_ids": theirs, "greedy_equal": ours == theirs[:len(ours)]}


def read_bandwidth() -> float:
    import torch

    x = torch.ones(2**31, dtype=torch.float16, device="cuda")  # 4 GiB
    x.sum()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return 2**32 / best


def benchmark(folder: Path, bandwidth: float) -> dict:
    gen = gptj_tvm.load(folder)
    weight_bytes = gen.meta.weight_bytes
    result = {"weight_bytes": weight_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
              "bound_ms": weight_bytes / bandwidth * 1e3}
    prompt = [(7 * i) % 50000 + 1 for i in range(1024)]
    for context in (128, 1024):
        cache = gen.new_cache()
        gen.forward("prefill", prompt[:context - 1], cache, context - 1)
        times = []
        for step in range(20):
            start = time.perf_counter()
            gen.forward("decode", [prompt[step % 100]], cache, context + step)  # .numpy() waits for the GPU
            times.append(time.perf_counter() - start)
        ms = float(np.median(times[3:]) * 1e3)
        result[f"decode_ms_context_{context}"] = ms
        result[f"decode_tokens_per_s_context_{context}"] = 1e3 / ms
        result[f"decode_bound_fraction_context_{context}"] = result["bound_ms"] / ms
    times = []
    for _ in range(4):
        start = time.perf_counter()
        gen.forward("prefill", prompt[:512], gen.new_cache(), 512)
        times.append(time.perf_counter() - start)
    result["prefill_tokens_per_s_512"] = 512 / min(times[1:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=".device")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="/tmp/gptj-tvm-device")
    parser.add_argument("--skip-6b", action="store_true")
    args = parser.parse_args()
    bundle, work, out = Path(args.bundle), Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import tvm

    device = tvm.cuda(0)
    report = {"gpu": device.device_name, "compute_version": device.compute_version, "models": {}}
    print(f"GPU: {report['gpu']} (compute {report['compute_version']})", flush=True)
    for name in ("tiny", "full4"):
        checkpoint, folder = prepare(bundle, work, name)
        report["models"][name] = check_against_reference(checkpoint, folder)
        print(name, json.dumps(report["models"][name]), flush=True)
        shutil.rmtree(checkpoint)
    if not args.skip_6b:
        _, folder = prepare(bundle, work, "gptj-6b")
        report["gptj-6b"] = benchmark(folder, read_bandwidth())
        b = report["gptj-6b"]
        print(f"\n| GPT-J-6B float16 on {report['gpu']} | value |\n| --- | --- |")
        print(f"| weights | {b['weight_bytes'] / 1e9:.2f} GB |")
        print(f"| read bandwidth | {b['read_bandwidth_gb_s']:.0f} GB/s |")
        print(f"| bound | {b['bound_ms']:.2f} ms/token |")
        for context in (128, 1024):
            print(f"| decode, context {context} | {b[f'decode_ms_context_{context}']:.2f} ms/token "
                  f"({b[f'decode_bound_fraction_context_{context}']:.0%} of the bound) |")
        print(f"| prefill, 512 tokens | {b['prefill_tokens_per_s_512']:.0f} tokens/s |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_device.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
