"""Our artifacts against ggml's gpt-j example and OpenVINO GenAI on the same model, on this machine, round by
round (each contender in a process of its own, the order rotating each round, a read-bandwidth probe before it):

    python benchmarks/vs_rivals.py --ours ART_Q4 --ours ART_Q8 \
        --ggml GGML_BUILD/bin/gpt-j:MODEL-q4_0.bin --ggml GGML_BUILD/bin/gpt-j:MODEL-q8_0.bin \
        --openvino OV_VENV/bin/python:OV_DIR_INT4 --openvino OV_VENV/bin/python:OV_DIR_INT8 \
        [--prompt-tokens 10,128,512] [--new-tokens 32] [--streams 8] [--stream-tokens 64] [--rounds 3]

For each: prefill seconds of each prompt length (the time to the first token), decode ms a token (one stream),
and --streams concurrent streams' tokens/s (ours: generate_batch; OpenVINO: its ContinuousBatchingPipeline;
ggml's example has no batching). The rivals come from their own installs, not this project's: ggml built from
its repository (examples/gpt-j: convert-h5-to-ggml.py, then gpt-j-quantize), OpenVINO from
`pip install openvino-genai optimum-intel nncf` in a venv of its own and `optimum-cli export openvino --model
CHECKPOINT --weight-format int4 --group-size 32 --sym --ratio 1.0` (or int8, fp16). Prompts are token ids where
the contender takes ids (ours, OpenVINO) and repeated words where it takes text (ggml: its count is read back).
The model's speed does not depend on which tokens, so random weights and tokens measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def ids(n: int, vocab: int = 50257, seed: int = 0) -> list[int]:
    return [(7919 * (i + seed) + 13) % vocab for i in range(n)]


# -- the children: each measures one contender and prints one JSON line -------------------------------------

def child_ours(artifact: str, prompts: list[int], new_tokens: int, streams: int, stream_tokens: int) -> dict:
    import gptj_tvm

    gen = gptj_tvm.load(artifact)
    gen.generate(ids(8), max_new_tokens=2)  # first calls
    prefill = {n: gen.generate(ids(n), max_new_tokens=1).stats["prefill_s"] for n in prompts}
    stats = gen.generate(ids(10), max_new_tokens=new_tokens, ignore_eos=True).stats
    result = {"prefill_s": prefill, "decode_ms": 1e3 * stats["decode_s"] / stats["decode_steps"]}
    if streams:
        start = time.perf_counter()
        outs = gen.generate_batch([ids(10, seed=s) for s in range(streams)], max_new_tokens=stream_tokens,
                                  max_batch=streams, ignore_eos=True)
        result["streams_tokens_s"] = sum(len(o.ids) for o in outs) / (time.perf_counter() - start)
    return result


def child_openvino(folder: str, prompts: list[int], new_tokens: int, streams: int, stream_tokens: int) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    def inputs(n, seed=0):
        tokens = np.array([ids(n, seed=seed)], dtype=np.int64)
        return og.TokenizedInputs(ov.Tensor(tokens), ov.Tensor(np.ones_like(tokens)))

    def config(n):
        return og.GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, do_sample=False)

    pipe = og.LLMPipeline(folder, "CPU")
    pipe.generate(inputs(8), config(2))
    prefill = {}
    for n in prompts:
        prefill[n] = pipe.generate(inputs(n), config(1)).perf_metrics.get_ttft().mean / 1e3
    metrics = pipe.generate(inputs(10), config(new_tokens)).perf_metrics
    result = {"prefill_s": prefill, "decode_ms": metrics.get_tpot().mean}
    if streams:
        del pipe
        batching = og.ContinuousBatchingPipeline(folder, og.SchedulerConfig(), "CPU")
        batching.generate([inputs(8).input_ids], [config(2)])
        start = time.perf_counter()
        outs = batching.generate([inputs(10, seed=s).input_ids for s in range(streams)],
                                 [config(stream_tokens)] * streams)
        result["streams_tokens_s"] = sum(len(o.m_generation_ids[0]) for o in outs) / (time.perf_counter() - start)
    return result


def child_ggml(spec: str, prompts: list[int], new_tokens: int, threads: int) -> dict:
    binary, model = spec.split(":", 1)

    def run(words: int, predict: int) -> tuple[int, float]:
        out = subprocess.run([binary, "-m", model, "-t", str(threads), "-b", "512", "-n", str(predict),
                              "--ignore-eos", "-s", "1", "-p", " hello" * words],
                             capture_output=True, text=True, check=True).stdout
        tokens = int(out.split("number of tokens in prompt =")[1].split()[0])
        return tokens, float(out.split("predict time =")[1].split()[0]) / 1e3

    # -n 1 evaluates the prompt and samples one token; -n N then adds N - 1 decode steps
    prefill = {}
    for n in prompts:
        tokens, seconds = run(n, 1)
        prefill[n] = seconds if tokens == n else None
    _, first = run(10, 1)
    _, whole = run(10, new_tokens)
    return {"prefill_s": prefill, "decode_ms": 1e3 * (whole - first) / (new_tokens - 1)}


# -- the parent ----------------------------------------------------------------------------------------------

def measure(kind: str, spec: str, args) -> dict:
    command = {"ours": [sys.executable], "ggml": [sys.executable],
               "openvino": [spec.split(":", 1)[0]]}[kind]
    target = spec.split(":", 1)[1] if kind == "openvino" else spec
    child = [*command, str(HERE), "--child", kind, target, "--prompt-tokens", args.prompt_tokens,
             "--new-tokens", str(args.new_tokens), "--streams", str(args.streams),
             "--stream-tokens", str(args.stream_tokens)]
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(child, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{kind} {spec}: failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", action="append", default=[], metavar="ARTIFACT")
    parser.add_argument("--ggml", action="append", default=[], metavar="BINARY:MODEL")
    parser.add_argument("--openvino", action="append", default=[], metavar="PYTHON:FOLDER")
    parser.add_argument("--prompt-tokens", default="10,128,512")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (0: none)")
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/vs_rivals.json")
    args = parser.parse_args()
    prompts = [int(n) for n in args.prompt_tokens.split(",")]
    if args.child:
        kind, target = args.child
        if kind == "ours":
            result = child_ours(target, prompts, args.new_tokens, args.streams, args.stream_tokens)
        elif kind == "openvino":
            result = child_openvino(target, prompts, args.new_tokens, args.streams, args.stream_tokens)
        else:
            result = child_ggml(target, prompts, args.new_tokens, int(os.environ.get("OMP_NUM_THREADS", 2)))
        print(json.dumps(result))
        return 0

    from gptj_tvm.runtime.bench import read_bandwidth

    contenders = ([("ours", s) for s in args.ours] + [("ggml", s) for s in args.ggml]
                  + [("openvino", s) for s in args.openvino])
    if not contenders:
        parser.error("name at least one contender (--ours, --ggml, --openvino)")
    rounds = []
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        bandwidth = read_bandwidth(gib=1.0, repeats=3)
        rounds.append({"read_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
                       "results": {f"{k} {s}": measure(k, s, args) for k, s in order}})
        print(f"round {r + 1}: read bandwidth {rounds[-1]['read_bandwidth_gb_s']:.1f} GB/s", flush=True)
    report(rounds, contenders, prompts, args)
    from report import write_result

    write_result({"args": vars(args), "rounds": rounds}, args.out)
    return 0


def report(rounds: list[dict], contenders, prompts: list[int], args) -> None:
    def median(name, pick):
        values = [pick(r["results"][name]) for r in rounds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    print(f"\n{args.threads} threads, medians of {len(rounds)} rounds; read bandwidth "
          + ", ".join(f"{r['read_bandwidth_gb_s']:.1f}" for r in rounds) + " GB/s")
    print("| contender | decode ms/token | " + " | ".join(f"prefill {n} s" for n in prompts)
          + f" | {args.streams} streams tokens/s |")
    print("| --- | --- | " + " | ".join("---" for _ in prompts) + " | --- |")
    for kind, spec in contenders:
        name = f"{kind} {spec}"
        row = [cell(median(name, lambda x: x["decode_ms"]), ".1f")]
        row += [cell(median(name, lambda x, n=n: x["prefill_s"].get(str(n), x["prefill_s"].get(n))), ".3f")
                for n in prompts]
        row.append(cell(median(name, lambda x: x.get("streams_tokens_s")), ".1f"))
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
