"""`gptj-tvm bench A B`: two artifacts of one model timed round by round, so that a noisy machine moves both.

A machine's read bandwidth can move by a third between runs minutes apart (other tenants), more than most
differences worth measuring. Here both artifacts are loaded in one process (or, where memory cannot hold
both, each round loads each in a process of its own), and every round times A and B back to back (ABBA order:
A first in even rounds, B first in odd ones) with a bandwidth read before it. Each round gives a ratio B/A of
the times (below 1: B is faster); the median and range of those ratios say whether the difference is real: a
range that holds 1.0 is too close to call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from gptj_tvm.core.child import run_json
from gptj_tvm.core.errors import GptjError
from gptj_tvm.core.interleaved import compare

from .artifact import ArtifactMetadata
from .bench import StepReads, cache_at, prompt, read_bandwidth, time_prefill
from .model import Model

MEMORY_MARGIN = 1.25  # weights of both plus a quarter for caches and activations: loaded together


class Contender:
    """One artifact loaded, with a KV cache ready at the context: its decode steps and a prefill per round."""

    def __init__(self, folder, context: int, steps: int):
        self.gen = Model.load(folder)
        self.context = min(context, self.gen.context - steps + 1)
        self.steps = steps
        self.cache = cache_at(self.gen, self.context, steps)
        self.ids = prompt(steps, self.gen.vocab_size)
        total = self.context + steps - 1
        calls = self.gen.profile("decode", [self.ids[0]], self.cache, total, measure=StepReads(self.gen, self.cache,
                                                                                               total))
        self.read_bytes = sum(read for _, _, read in calls if read)

    def round(self, prefill_tokens: int) -> dict:
        """Decode ms (median of the steps; each round rewrites the same positions) and prefill seconds."""
        times = []
        for i in range(self.steps):
            start = time.perf_counter()
            self.gen.forward("decode", [self.ids[i]], self.cache, self.context + i)
            times.append(time.perf_counter() - start)
        return {"decode_ms": 1e3 * float(np.median(times)),
                "prefill_s": time_prefill(self.gen, min(prefill_tokens, self.gen.context)),
                "read_bytes": self.read_bytes}


def _round_in_child(folder, context: int, steps: int, prefill_tokens: int) -> dict:
    return run_json([sys.executable, "-m", "gptj_tvm.runtime.ab", folder, "--context", context, "--steps", steps,
                     "--prefill", prefill_tokens], what=f"{folder}: timing it in a child process")


def run_ab(a, b, rounds: int = 5, context: int = 128, steps: int = 8, prefill_tokens: int = 128,
           bandwidth: bool = True, progress: bool = True) -> dict:
    if rounds < 2:
        raise GptjError(f"--rounds must be at least 2 to compare rounds, got {rounds}")
    metas = [ArtifactMetadata.read(Path(folder)) for folder in (a, b)]
    if metas[0].config != metas[1].config:
        first, second = (m.config.to_dict() for m in metas)
        differs = sorted(k for k in first if first[k] != second.get(k))
        raise GptjError(f"{a} and {b} are different models ({', '.join(differs)} differ): A/B compares two "
                        "builds of one model")
    weight_bytes = [meta.weight_bytes for meta in metas]
    together = sum(weight_bytes) * MEMORY_MARGIN < psutil.virtual_memory().available
    contenders = [Contender(folder, context, steps) for folder in (a, b)] if together else None
    samples, rows = [], []
    for r in tqdm(range(rounds), desc="A/B rounds", disable=not progress, leave=False):
        bandwidth_read = read_bandwidth(gib=1.0, repeats=3) if bandwidth else None
        order = (0, 1) if r % 2 == 0 else (1, 0)
        timed = {}
        for side in order:
            timed[side] = (contenders[side].round(prefill_tokens) if together
                           else _round_in_child((a, b)[side], context, steps, prefill_tokens))
        rows.append(timed)
        samples.append(bandwidth_read)
    result = {"a": str(a), "b": str(b), "rounds": rounds, "mode": "one process" if together else
              "a process per artifact and round (both do not fit in memory)", "context": context,
              "decode_steps": steps, "prefill_tokens": prefill_tokens,
              "read_bandwidth_gb_s": [s / 1e9 if s else None for s in samples],
              "decode_ms": compare([row[0]["decode_ms"] for row in rows], [row[1]["decode_ms"] for row in rows]),
              "prefill_s": compare([row[0]["prefill_s"] for row in rows], [row[1]["prefill_s"] for row in rows])}
    if all(samples):
        for side, key in ((0, "a"), (1, "b")):
            result[f"{key}_x_bound"] = [row[side]["decode_ms"] / (1e3 * row[side]["read_bytes"] / s)
                                        for row, s in zip(rows, samples)]
    return result


def table(result: dict) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{result['rounds']} rounds ({result['mode']}), decode at context {result['context']} "
             f"(median of {result['decode_steps']} steps), prefill of {result['prefill_tokens']} tokens"]
    if result["read_bandwidth_gb_s"][0]:
        lines.append("read bandwidth before each round: "
                     + ", ".join(f"{b:.1f}" for b in result["read_bandwidth_gb_s"]) + " GB/s")
    lines.append(f"{'':14s} {'A median':>10s} {'A range':>17s} {'B median':>10s} {'B range':>17s} "
                 f"{'B/A median':>10s} {'B/A range':>13s}")
    for key, label in (("decode_ms", "decode ms"), ("prefill_s", "prefill s")):
        s = result[key]
        lines.append(f"{label:14s} {s['a_median']:10.3f} {s['a_range'][0]:8.3f}-{s['a_range'][1]:<8.3f} "
                     f"{s['b_median']:10.3f} {s['b_range'][0]:8.3f}-{s['b_range'][1]:<8.3f} "
                     f"{s['ratio_median']:10.3f} {s['ratio_range'][0]:6.3f}-{s['ratio_range'][1]:<6.3f}")
    for key, label in (("decode_ms", "decode"), ("prefill_s", "prefill")):
        lines.append(f"{label}: {result[key]['verdict']}")
        lines.append("  B/A per round: " + ", ".join(f"{r:.3f}" for r in result[key]["ratio"]))
    if "a_x_bound" in result:
        lines.append("decode x the bound (bytes a step reads / that round's bandwidth): A "
                     f"{np.median(result['a_x_bound']):.2f}, B {np.median(result['b_x_bound']):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":  # one round of one artifact, for rounds that load each artifact alone
    parser = argparse.ArgumentParser(description="Time one A/B round of one artifact (used by gptj-tvm bench A B).")
    parser.add_argument("artifact")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=128)
    args = parser.parse_args()
    print(json.dumps(Contender(args.artifact, args.context, args.steps).round(args.prefill)))
