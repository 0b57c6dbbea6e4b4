"""gptj-tvm against Hugging Face transformers on the same checkpoint, prompt and settings, in one run.

    python benchmarks/vs_transformers.py CHECKPOINT ARTIFACT [--prompt-tokens 128] [--new-tokens 16]
        [--transformers-python PYTHON] [--out benchmarks/results/vs_transformers.json]

Greedy generation of --new-tokens after a --prompt-tokens prompt, each side in its own process (so each peak
RSS is its own): transformers on the CPU in bfloat16 with as many threads as TVM gets, the artifact with
TVM_NUM_THREADS threads. Reports prefill seconds, decode ms/token, peak RSS, whether the generated ids agree,
and the bandwidth bound of the artifact (weight bytes / read bandwidth measured in the same run). Where
transformers (or torch) is not installed, its column says so. Give transformers its own environment with
--transformers-python: tvm_ffi imports torch whenever torch is installed, which adds 0.5 GB to gptj-tvm's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from gptj_tvm import default_threads  # importing gptj_tvm sets TVM_NUM_THREADS before TVM starts
from gptj_tvm.core.child import run_json
from gptj_tvm.core.errors import GptjError

THREADS = int(os.environ.get("TVM_NUM_THREADS", default_threads()))


def prompt_ids(n: int) -> list[int]:
    return [(7919 * i + 13) % 50000 for i in range(n)]


def run_ours(artifact: str, prompt: list[int], new_tokens: int) -> dict:
    import gptj_tvm

    gen = gptj_tvm.load(artifact)
    gen.generate(prompt[:8], max_new_tokens=2)  # warm up
    out = gen.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    weight_bytes = gen.meta.weight_bytes
    return {"ids": out.ids, "prefill_s": out.stats["prefill_s"],
            "decode_ms": 1e3 * out.stats["decode_s"] / max(out.stats["decode_steps"], 1),
            "weight_bytes": weight_bytes, "dtype": gen.meta.dtype, "quantization": gen.meta.quantization}


def run_transformers(checkpoint: str, prompt: list[int], new_tokens: int) -> dict:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        return {"error": f"not installed ({err})"}
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - start
        past, token = out.past_key_values, int(out.logits[0, -1].float().argmax())
        generated, steps = [token], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - start)
            past, token = out.past_key_values, int(out.logits[0, -1].float().argmax())
            generated.append(token)
    return {"ids": generated, "prefill_s": prefill_s, "decode_ms": 1e3 * sum(steps) / max(len(steps), 1),
            "version": __import__("transformers").__version__, "torch": torch.__version__}


def worker(args) -> int:
    prompt = prompt_ids(args.prompt_tokens)
    result = (run_ours(args.artifact, prompt, args.new_tokens) if args.worker == "ours"
              else run_transformers(args.checkpoint, prompt, args.new_tokens))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


def in_process(args, side: str) -> dict:
    python = args.transformers_python if side == "transformers" else sys.executable
    cmd = [python, __file__, args.checkpoint, args.artifact, "--worker", side,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    try:
        return run_json(cmd, what=side)
    except GptjError as err:
        return {"error": str(err)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("artifact")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--transformers-python", default=sys.executable,
                        help="the Python that has torch and transformers (default: this one)")
    parser.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/vs_transformers.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from gptj_tvm.runtime.bench import read_bandwidth

    report = {"threads": THREADS, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "read_bandwidth_gb_s": (read_bandwidth() or 0) / 1e9}
    report["gptj_tvm"] = in_process(args, "ours")
    report["transformers"] = in_process(args, "transformers")
    ours, theirs = report["gptj_tvm"], report["transformers"]
    if "weight_bytes" in ours and report["read_bandwidth_gb_s"]:
        ours["bound_ms"] = ours["weight_bytes"] / (report["read_bandwidth_gb_s"] * 1e9) * 1e3
    if "ids" in ours and "ids" in theirs:
        report["same_greedy_ids"] = ours["ids"] == theirs["ids"]
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, {THREADS} threads; "
          f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s")
    print("| | gptj-tvm | transformers |\n| --- | --- | --- |")
    for key, label, fmt in (("prefill_s", "prefill", "{:.2f} s"), ("decode_ms", "decode", "{:.0f} ms/token"),
                            ("peak_rss_bytes", "peak RSS", "{:.2e} B")):
        cells = [fmt.format(side[key]) if key in side else side.get("error", "-") for side in (ours, theirs)]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    if "bound_ms" in ours:
        print(f"| bound (artifact weights / bandwidth) | {ours['bound_ms']:.0f} ms/token | |")
    if "same_greedy_ids" in report:
        print(f"same greedy tokens: {report['same_greedy_ids']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
