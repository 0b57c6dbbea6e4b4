"""`gptj-tvm serve --replicas 2` (Ray Serve, one CPU per replica) against the single process (every core), the
same requests, on this machine:

    python benchmarks/replicas.py ARTIFACT [--rounds 3] [--prompt-tokens 128] [--itl-tokens 64]
        [--conversations 4] [--turns 4] [--message-words 48] [--new-tokens 32] [--max-batch 4]
        [--out benchmarks/results/replicas.json]

- the proxy's cost per token: one stream's inter-token latency (p50 of its gaps), rounds alternating between the
  single process and the cluster, both up at once. Against 2 replicas of one core each, and against 1 replica of
  every core (`--replicas 1 --replica-cpus N`: the same cores as the single process, so the difference is the
  proxy and the ingress alone);
- throughput: 2 x --max-batch streams at once on the 2 replicas, aggregate tokens/s, and the CPU seconds Ray's HTTP
  proxy and our ingress spent per token relayed (their processes' CPU times, from psutil);
- a multi-turn chat load: --conversations at once, --turns each (a turn: the history, a new user message of
  --message-words words, --new-tokens generated, greedy), on 2 replicas with prefix routing on and off, and on the
  single process: prompt tokens prefilled (prompt less usage's cached_tokens), time to first token (p50, p99).

Then, on paper, what N machines would serve: N x the per-replica throughput, until the ingress's CPU per token
says one ingress (one core) cannot relay more. The servers are CLI processes; one or two are up at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import psutil

from gptj_tvm.runtime.artifact import ArtifactMetadata
from report import write_result  # benchmarks/report.py (a script's folder is on its path)
from serve import concurrent_round, free_port, prompts  # benchmarks/serve.py

READY_TIMEOUT_S = 900
WORDS = ("time river light stone garden winter letter music window morning paper story mountain city question "
         "answer friend market ocean forest engine summer voice number island candle bridge harbor").split()


class Server:
    """`gptj-tvm serve ARTIFACT FLAGS` on a free loopback port, up until stop()."""

    def __init__(self, name: str, artifact: str, flags: list[str], threads: int | None = None, replicas: int = 0):
        self.name, self.port, self.replicas = name, free_port(), replicas
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        if threads is not None:
            env["TVM_NUM_THREADS"] = str(threads)
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"replicas-{name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, "-m", "gptj_tvm.cli", "serve", artifact, "--port",
                                         str(self.port), *flags], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not start; its output: {self.log.name}")
            time.sleep(1)
        print(f"  {name} ready", file=sys.stderr)

    def _ready(self) -> bool:
        try:
            answer = httpx.get(self.url + "/health", trust_env=False, timeout=10)
        except httpx.TransportError:
            return False
        if answer.status_code != 200:
            return False
        replicas = answer.json().get("replicas", {})  # the single process has none
        return len(replicas) == self.replicas and all(r["phase"] == "ready" for r in replicas.values())

    def relay_cpu_s(self) -> float:
        """CPU seconds so far of Ray's HTTP proxy and the ingress replica (0 for the single process)."""
        total = 0.0
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                title = " ".join(child.cmdline())
                if "ray::ProxyActor" in title or "ray::ServeReplica:gptj-tvm:Ingress" in title:
                    times = child.cpu_times()
                    total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


def one_stream_rounds(servers: list[Server], prompt: list[int], tokens: int, rounds: int) -> dict:
    """Inter-token latency of one stream, alternating servers round by round: name -> p50 ms per round."""
    out = {s.name: [] for s in servers}
    for server in servers:
        asyncio.run(concurrent_round(server.url, [prompt[:16]], 4, 600))  # warm up
    for _ in range(rounds):
        for server in servers:
            out[server.name].append(asyncio.run(concurrent_round(server.url, [prompt], tokens, 600))["itl_p50_ms"])
    return out


def throughput(server: Server, batch: list[list[int]], tokens: int) -> dict:
    before = server.relay_cpu_s()
    result = asyncio.run(concurrent_round(server.url, batch, tokens, 1800))
    result["relay_cpu_s_per_token"] = (server.relay_cpu_s() - before) / result["generated_tokens"]
    return result


async def chat_turn(http, messages: list[dict], new_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, text, usage = time.perf_counter(), None, [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        replica = answer.headers.get("x-gptj-replica", "single")
        async for line in answer.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    text.append(choice["delta"]["content"])
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"ttft_s": first, "prompt_tokens": usage["prompt_tokens"], "prefilled": usage["prompt_tokens"] - cached,
            "reply": "".join(text), "replica": replica}


def chat_load(server: Server, args) -> list[dict]:
    """--conversations at once, turn by turn: per turn, prompt tokens, prefilled, TTFT p50/p99, replicas used."""
    rng = random.Random(7)
    histories = [[{"role": "system", "content": f"You are assistant number {i}."}] for i in range(args.conversations)]
    turns = []

    async def run_turn(messages_per_conversation):
        limits = httpx.Limits(max_connections=args.conversations + 4)
        async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=1800, limits=limits) as http:
            return await asyncio.gather(*(chat_turn(http, m, args.new_tokens) for m in messages_per_conversation))

    for _ in range(args.turns):
        for history in histories:
            history.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(args.message_words))})
        results = asyncio.run(run_turn(histories))
        for history, result in zip(histories, results):
            history.append({"role": "assistant", "content": result["reply"]})
        ttft = [r["ttft_s"] for r in results]
        turns.append({"prompt_tokens": sum(r["prompt_tokens"] for r in results),
                      "prefilled": sum(r["prefilled"] for r in results),
                      "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
                      "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
                      "replicas": [r["replica"] for r in results]})
    return turns


def slot_flags(args, meta: ArtifactMetadata, batch: int) -> list[str]:
    """KV cache for `batch` slots of what the longest request needs (the whole context would be GBs a slot)."""
    chat = args.turns * (2 * args.message_words + args.new_tokens + 16) + 16  # a word is at most ~2 tokens here
    positions = min(meta.config.n_positions, max(args.prompt_tokens + args.itl_tokens + 1, chat))
    gb = 1.01 * batch * positions * meta.kv_bytes_per_position / 1e9
    return ["--max-batch", str(batch), "--max-queue", str(8 * batch), "--kv-cache-gb", f"{gb:.9f}"]


def table(report: dict) -> str:
    lines = [f"{report['cpus']} cores; one stream: {report['prompt_tokens']}-token prompt, {report['itl_tokens']} "
             f"tokens, rounds alternating", "",
             "| against | single ITL p50 ms | replicas ITL p50 ms | ratio (median) |", "| --- | --- | --- | --- |"]
    for name, rounds in report["one_stream"].items():
        single, ours = rounds["single"], rounds[name]
        ratio = float(np.median(np.array(ours) / np.array(single)))
        lines.append(f"| {name} | {' '.join(f'{x:.1f}' for x in single)} | {' '.join(f'{x:.1f}' for x in ours)} "
                     f"| {ratio:.3f} |")
    t = report["throughput"]
    lines += ["", f"throughput, {t['concurrency']} streams on 2 replicas: {t['tokens_per_s']:.1f} tokens/s "
                  f"({t['tokens_per_s'] / 2:.1f} a replica); proxy + ingress CPU "
                  f"{1e3 * t['relay_cpu_s_per_token']:.2f} ms a token", "",
              "| turn | prompt tokens | prefilled: routing on / off / single | TTFT p50 ms: on / off / single "
              "| TTFT p99 ms: on / off / single |", "| --- | --- | --- | --- | --- |"]
    on, off, single = (report["chat"][k] for k in ("routing_on", "routing_off", "single"))
    for i, (a, b, c) in enumerate(zip(on, off, single), 1):
        lines.append(f"| {i} | {a['prompt_tokens']} | {a['prefilled']} / {b['prefilled']} / {c['prefilled']} | "
                     f"{a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} / {c['ttft_p50_ms']:.0f} | "
                     f"{a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f} / {c['ttft_p99_ms']:.0f} |")
    lines += ["", "on paper (N machines, one replica each; one ingress on one core):"]
    for n, served in report["on_paper"].items():
        lines.append(f"  {n} machines: {served:.0f} tokens/s")
    return "\n".join(lines)


def on_paper(per_replica_tps: float, relay_cpu_s_per_token: float, machines=(1, 2, 4, 8, 16, 32)) -> dict:
    """N replicas serve N x per replica until one ingress core is spent relaying (the proxies run on every node,
    so the one ingress is the ceiling; its share of the relay CPU is counted whole here, an upper bound on it)."""
    ceiling = 1 / relay_cpu_s_per_token if relay_cpu_s_per_token > 0 else float("inf")
    return {str(n): min(n * per_replica_tps, ceiling) for n in machines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--itl-tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--message-words", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=4, help="each engine's --max-batch")
    parser.add_argument("--out", default="benchmarks/results/replicas.json")
    args = parser.parse_args()
    meta = ArtifactMetadata.read(args.artifact)
    cpus = len(os.sched_getaffinity(0))
    prompt = prompts(1, args.prompt_tokens, meta.config.vocab_size, seed=3)[0]
    flags = slot_flags(args, meta, args.max_batch)
    report = {"artifact": args.artifact, "cpus": cpus, "prompt_tokens": args.prompt_tokens,
              "itl_tokens": args.itl_tokens, "max_batch": args.max_batch, "one_stream": {}, "chat": {}}
    single = Server("single", args.artifact, flags, threads=cpus)
    try:
        cluster = Server("2 replicas x 1 CPU", args.artifact, flags + ["--replicas", "2", "--replica-cpus", "1"],
                         replicas=2)
        try:
            report["one_stream"][cluster.name] = one_stream_rounds([single, cluster], prompt, args.itl_tokens,
                                                                   args.rounds)
            batch = prompts(2 * args.max_batch, args.prompt_tokens, meta.config.vocab_size, seed=5)
            report["throughput"] = throughput(cluster, batch, args.itl_tokens)
            report["chat"]["routing_on"] = chat_load(cluster, args)
        finally:
            cluster.stop()
        cluster = Server("2 replicas, no prefix routing", args.artifact,
                         flags + ["--replicas", "2", "--replica-cpus", "1", "--no-prefix-routing"], replicas=2)
        try:
            report["chat"]["routing_off"] = chat_load(cluster, args)
        finally:
            cluster.stop()
        report["chat"]["single"] = chat_load(single, args)
        cluster = Server(f"1 replica x {cpus} CPUs", args.artifact,
                         flags + ["--replicas", "1", "--replica-cpus", str(cpus)], replicas=1)
        try:
            report["one_stream"][cluster.name] = one_stream_rounds([single, cluster], prompt, args.itl_tokens,
                                                                   args.rounds)
        finally:
            cluster.stop()
    finally:
        single.stop()
    t = report["throughput"]
    report["on_paper"] = on_paper(t["tokens_per_s"] / 2, t["relay_cpu_s_per_token"])
    print(table(report))
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
