"""`gptj-tvm serve` under concurrent streams, next to one stream alone and to the bandwidth bound, in one run.

    python benchmarks/serve.py ARTIFACT [--concurrency 1,2,4,8,16] [--prompt-tokens 128] [--new-tokens 64]
        [--max-batch 16] [--transformers CHECKPOINT_DIR [--transformers-python PYTHON]] [--no-bandwidth]
        [--out benchmarks/results/serve.json]

In order, each in a process of its own (one model in memory at a time): the read bandwidth; one stream decoded
by `Generator.generate` (prefill, then ms/token); the server (`gptj-tvm serve` on 127.0.0.1, KV cache sized to
--max-batch sequences of prompt + new tokens), sent each concurrency's streams at once (greedy, distinct prompts,
the token ids of every chunk counted), reporting aggregate generated tokens/s, time to first token and
inter-token latency (p50, p99); with --transformers, the same prompts through transformers' batched generate
(batch 8, left-padded, greedy; torch in its own process). A decode step reads every weight once whatever the
batch, so weight bytes / bandwidth bounds a step (the embedding counted whole, though a step reads one row of it),
and c streams can reach at most c tokens per bound. A round also prefills its c prompts, so the schedule bound
c x new tokens / (c x prefill + (new tokens - 1) x decode step) is what any schedule could reach with this
artifact's kernels: every prompt is prefilled before the last stream's first token, and that stream still needs
its decode steps, each at least a one-row step. Prefill and step are the one-stream round's time to first token
and inter-token latency (p50), or without that round the single stream's, measured minutes apart (this machine's
bandwidth moves by a third in minutes, so a round can pass a bound taken from another moment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from gptj_tvm import default_threads  # importing gptj_tvm sets TVM_NUM_THREADS before TVM starts
from gptj_tvm.core.child import run_json
from gptj_tvm.core.errors import GptjError

from report import write_result  # benchmarks/report.py (a script's folder is on its path)

THREADS = int(os.environ.get("TVM_NUM_THREADS", default_threads()))
READY_TIMEOUT_S = 900  # loading GPT-J-6B from a cold disk


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct prompts of GPT-2's ordinary tokens (below its <|endoftext|>)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, 50256), (count, length)).tolist()


def solo_worker(args) -> dict:
    import gptj_tvm

    gen = gptj_tvm.load(args.artifact)
    prompt = prompts(1, args.prompt_tokens, gen.vocab_size, seed=99)[0]
    gen.generate(prompt[:8], max_new_tokens=2)  # warm up
    out = gen.generate(prompt, max_new_tokens=args.new_tokens, temperature=0)
    return {"prefill_s": out.stats["prefill_s"], "decode_steps": out.stats["decode_steps"],
            "decode_ms": 1e3 * out.stats["decode_s"] / max(out.stats["decode_steps"], 1),
            "weight_bytes": gen.meta.weight_bytes, "vocab_size": gen.vocab_size,
            "kv_bytes_per_position": gen.meta.kv_bytes_per_position}


def transformers_worker(args) -> dict:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        return {"error": f"not installed ({err})"}
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(args.transformers, torch_dtype=torch.bfloat16).eval()
    batch = prompts(8, args.prompt_tokens, model.config.vocab_size)
    ids = torch.tensor(batch)  # all the same length: left padding adds none, the mask says so
    mask = torch.ones_like(ids)
    options = dict(attention_mask=mask, do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, **options)  # warm up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **options)
        seconds = time.perf_counter() - start
    generated = int((out.shape[1] - ids.shape[1]) * out.shape[0])
    return {"batch": 8, "seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds,
            "transformers": __import__("transformers").__version__, "torch": torch.__version__}


def in_child(args, worker: str, python: str = sys.executable) -> dict:
    cmd = [python, __file__, args.artifact, "--worker", worker, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens)] + (["--transformers", args.transformers] if args.transformers else [])
    try:
        return run_json(cmd, what=worker)
    except GptjError as err:
        return {"error": str(err)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def stream_one(http, prompt: list[int], new_tokens: int) -> dict:
    """One streamed greedy completion: the time of each generated token's chunk after sending."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "return_token_ids": True}
    start, arrivals = time.perf_counter(), []
    async with http.stream("POST", "/v1/completions", json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"the server answered {answer.status_code}: {(await answer.aread())[:200]!r}")
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                now = time.perf_counter() - start
                arrivals += [now] * len(chunk["choices"][0].get("token_ids", []))
    return {"ttft_s": arrivals[0], "itl_s": np.diff(arrivals).tolist(), "tokens": len(arrivals),
            "done_s": arrivals[-1]}


async def concurrent_round(url: str, batch: list[list[int]], new_tokens: int, timeout: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        streams = await asyncio.wait_for(asyncio.gather(*(stream_one(http, p, new_tokens) for p in batch)), timeout)
        wall = time.perf_counter() - start
    ttft = [s["ttft_s"] for s in streams]
    itl = [gap for s in streams for gap in s["itl_s"]]
    tokens = sum(s["tokens"] for s in streams)
    return {"concurrency": len(batch), "generated_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)) if itl else None,
            "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)) if itl else None}


def serve_rounds(args, solo: dict) -> list[dict]:
    import httpx

    port = free_port()
    slot = args.prompt_tokens + args.new_tokens + 1
    kv_gb = args.max_batch * slot * solo["kv_bytes_per_position"] / 1e9
    cmd = [sys.executable, "-m", "gptj_tvm.cli", "serve", args.artifact, "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-queue", str(max(args.concurrency)), "--kv-cache-gb", f"{kv_gb * 1.01:.9f}"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server stopped: {server.stderr.read().strip().splitlines()[-1:]}")
            try:
                if httpx.get(url + "/health", trust_env=False, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        all_prompts = prompts(max(args.concurrency) + 1, args.prompt_tokens, solo["vocab_size"])
        timeout = args.round_timeout
        asyncio.run(concurrent_round(url, all_prompts[-1:], 4, timeout))  # warm up
        rounds = []
        for concurrency in args.concurrency:
            rounds.append(asyncio.run(concurrent_round(url, all_prompts[:concurrency], args.new_tokens, timeout)))
            print(f"  {concurrency} streams: {rounds[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        return rounds
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


def schedule_bound(report: dict, streams: int) -> float:
    """Aggregate tokens/s no schedule can pass with one stream's prefill and decode rates (module doc)."""
    new = report["new_tokens"]
    alone = [r for r in report["rounds"] if r["concurrency"] == 1 and r["itl_p50_ms"] is not None]
    if alone:
        prefill_s, step_s = alone[0]["ttft_p50_ms"] / 1e3, alone[0]["itl_p50_ms"] / 1e3
    else:
        prefill_s, step_s = report["single_stream"]["prefill_s"], report["single_stream"]["decode_ms"] / 1e3
    return streams * new / (streams * prefill_s + (new - 1) * step_s)


def table(report: dict) -> str:
    solo, bound = report["single_stream"], report.get("bound_ms")
    lines = [f"{report['prompt_tokens']}-token prompts, {report['new_tokens']} new tokens, greedy, "
             f"{report['threads']} threads, --max-batch {report['max_batch']}"]
    if "error" in solo:
        return "\n".join(lines + [f"single stream: {solo['error']}"])
    bound_text = f"; read bound {bound:.1f} ms/step at {report['read_bandwidth_gb_s']:.1f} GB/s" if bound else ""
    lines.append(f"single stream (generate): prefill {solo['prefill_s']:.2f} s, decode {solo['decode_ms']:.1f} "
                 f"ms/token ({1e3 / solo['decode_ms']:.1f} tokens/s){bound_text}")
    lines += ["", "| streams | tokens/s | x one stream | TTFT p50 / p99 ms | ITL p50 / p99 ms | bound tokens/s "
              "| schedule bound tokens/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rounds"]:
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" if r["itl_p50_ms"] is not None else "-"
        ceiling = f"{r['concurrency'] * 1e3 / bound:.1f}" if bound else "-"
        speedup = r["tokens_per_s"] * solo["decode_ms"] / 1e3
        lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {speedup:.2f} "
                     f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {itl} | {ceiling} "
                     f"| {r['schedule_bound_tokens_per_s']:.1f} |")
    theirs = report.get("transformers")
    if theirs:
        lines.append("\ntransformers generate, batch 8: " + (theirs["error"] if "error" in theirs else
                                                             f"{theirs['tokens_per_s']:.1f} tokens/s"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="streams at once, one round each")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    parser.add_argument("--round-timeout", type=float, default=1800, help="seconds one round may take")
    parser.add_argument("--transformers", metavar="CHECKPOINT_DIR", help="also transformers' batched generate")
    parser.add_argument("--transformers-python", default=sys.executable,
                        help="the Python that has torch and transformers (default: this one)")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth read (no bound)")
    parser.add_argument("--bandwidth-gib", type=float, default=4.0, help="buffer of the bandwidth read (default 4)")
    parser.add_argument("--worker", choices=("solo", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(solo_worker(args) if args.worker == "solo" else transformers_worker(args)))
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    report = {"artifact": args.artifact, "threads": THREADS, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "max_batch": args.max_batch}
    if not args.no_bandwidth:
        from gptj_tvm.runtime.bench import read_bandwidth

        bandwidth = read_bandwidth(gib=args.bandwidth_gib)
        if bandwidth:
            report["read_bandwidth_gb_s"] = bandwidth / 1e9
    report["single_stream"] = solo = in_child(args, "solo")
    if "error" in solo:
        print(table(report))
        return 1
    if "read_bandwidth_gb_s" in report:
        report["bound_ms"] = 1e3 * solo["weight_bytes"] / (report["read_bandwidth_gb_s"] * 1e9)
    report["rounds"] = serve_rounds(args, solo)
    for r in report["rounds"]:
        r["schedule_bound_tokens_per_s"] = schedule_bound(report, r["concurrency"])
    if args.transformers:
        report["transformers"] = in_child(args, "transformers", args.transformers_python)
    print(table(report))
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
