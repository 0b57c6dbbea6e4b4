"""The prefix cache on the batched engine, cache on against off in one process, round by round:

- chat: `--users` conversations at once, each turn a new user message of `--message-tokens` appended to the history
  (previous prompts and answers) and `--new-tokens` generated; time to first token per turn and prompt tokens
  prefilled, next to the same users sending the message alone (no history, cold);
- system prompt: one `--system-tokens` system prompt, a first user alone, then `--system-users - 1` more together,
  each with its own question; prompt tokens prefilled, and users 2..n's time to first token next to the same
  questions and answers with no system prompt;
- no shared prefix: a cold prompt's time to first token and single-stream decode, to show what the cache costs.

    python benchmarks/prefix_cache.py ARTIFACT [--turns 6 --users 4 --rounds 2]

Random token ids stand in for text (the model's speed does not depend on which tokens). Prints a table per part and
writes JSON; times are seconds from submission, so they include waiting for a slot and for other users' chunks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import gptj_tvm
from gptj_tvm.runtime.engine import SamplingParams, TokenEvent
from report import write_result


class Run:
    """An engine over the loaded model, and requests run to the end through it."""

    def __init__(self, gen, users: int, cache: bool, chunk: int):
        # its memory reserved at start, as the server's is: a fresh slot's first rows would otherwise wait for pages
        self.engine = gen.engine(max_batch=users, max_queue=4 * users, prefill_chunk=chunk, prefix_cache=cache,
                                 reserve_memory=True)

    def together(self, prompts: list[list[int]], new_tokens: int) -> list[dict]:
        outputs = [[] for _ in prompts]
        requests = [self.engine.submit(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                                       lambda e, out=out: out.append(e.token) if isinstance(e, TokenEvent) else None)
                    for p, out in zip(prompts, outputs)]
        start = time.perf_counter()
        self.engine.run_until_idle()
        seconds = time.perf_counter() - start
        return [{"ttft_s": r.first_token_s, "prefilled": len(r.prompt_ids) - r.cached_tokens, "ids": out,
                 "decode_ms": 1e3 * r.stats["decode_s"] / max(r.stats["decode_steps"], 1), "wall_s": seconds}
                for r, out in zip(requests, outputs)]


def chat(gen, args, rng, cache: bool) -> list[dict]:
    run, histories, turns = Run(gen, args.users, cache, args.prefill_chunk), [[] for _ in range(args.users)], []
    for _ in range(args.turns):
        messages = [list(rng.integers(0, gen.vocab_size, args.message_tokens)) for _ in range(args.users)]
        prompts = [h + m for h, m in zip(histories, messages)]
        results = run.together(prompts, args.new_tokens)
        alone = Run(gen, args.users, False, args.prefill_chunk).together(messages, 1)
        histories = [p + r["ids"] for p, r in zip(prompts, results)]
        turns.append({"prompt_tokens": sum(map(len, prompts)), "prefilled": sum(r["prefilled"] for r in results),
                      "ttft_s": max(r["ttft_s"] for r in results),
                      "message_alone_ttft_s": max(r["ttft_s"] for r in alone)})
    return turns


def system_prompt(gen, args, rng, cache: bool) -> dict:
    system = list(rng.integers(0, gen.vocab_size, args.system_tokens))
    questions = [list(rng.integers(0, gen.vocab_size, args.message_tokens // 2)) for _ in range(args.system_users)]
    run = Run(gen, args.system_users, cache, args.prefill_chunk)
    first = run.together([system + questions[0]], args.new_tokens)
    rest = run.together([system + q for q in questions[1:]], args.new_tokens)
    # the same users and answers with no system prompt: their steps carry the same decode rows
    bare = Run(gen, args.system_users, False, args.prefill_chunk).together(questions[1:], args.new_tokens)
    return {"prefilled": sum(r["prefilled"] for r in first + rest),
            "prompt_tokens": (args.system_tokens + args.message_tokens // 2) * args.system_users,
            "first_ttft_s": first[0]["ttft_s"], "rest_ttft_s": max(r["ttft_s"] for r in rest),
            "no_system_ttft_s": max(r["ttft_s"] for r in bare)}


def cold(gen, args, rng, cache: bool) -> dict:
    prompt = list(rng.integers(0, gen.vocab_size, min(128, gen.context // 2)))
    (result,) = Run(gen, 1, cache, args.prefill_chunk).together([prompt], args.new_tokens)
    return {"ttft_s": result["ttft_s"], "decode_ms": result["decode_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--message-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--system-users", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="cache on and off alternate (ABBA)")
    parser.add_argument("--parts", default="chat,system,cold", help="which of chat, system, cold to run")
    parser.add_argument("--out", default="benchmarks/results/prefix_cache.json")
    args = parser.parse_args()
    gen = gptj_tvm.load(args.artifact)
    gen.generate_batch([[1, 2, 3]], max_new_tokens=2)  # first-call costs
    result = {"args": vars(args), "rounds": []}
    for r in range(args.rounds):
        for cache in ((True, False) if r % 2 == 0 else (False, True)):
            rng = np.random.default_rng(r)  # the same conversations with the cache on and off
            parts = {"chat": chat, "system": system_prompt, "cold": cold}
            side = {"cache": cache, **{name: parts[name](gen, args, rng, cache) for name in args.parts.split(",")}}
            result["rounds"].append(side)
            print(f"round {r + 1}, cache {'on' if cache else 'off'}: done", flush=True)
    report(result, args)
    write_result(result, args.out)
    return 0


def report(result: dict, args) -> None:
    def median(cache: bool, pick) -> float:
        return statistics.median(pick(side) for side in result["rounds"] if side["cache"] == cache)

    parts = args.parts.split(",")
    if "chat" in parts:
        report_chat(args, median)
    if "system" in parts:
        report_system(args, median)
    if "cold" in parts:
        report_cold(result)


def report_chat(args, median) -> None:
    print(f"\nchat: {args.users} users, +{args.message_tokens} tokens a turn, {args.new_tokens} new "
          f"(medians of {args.rounds} rounds; TTFT of the slowest user)")
    print("turn | prompt tokens | prefilled on / off | TTFT on / off s | message alone s | on / alone")
    for t in range(args.turns):
        on, off = (median(c, lambda s, t=t: s["chat"][t]["ttft_s"]) for c in (True, False))
        alone = median(True, lambda s, t=t: s["chat"][t]["message_alone_ttft_s"])
        print(f"{t + 1:4} | {median(True, lambda s, t=t: s['chat'][t]['prompt_tokens']):13.0f} | "
              f"{median(True, lambda s, t=t: s['chat'][t]['prefilled']):7.0f} / "
              f"{median(False, lambda s, t=t: s['chat'][t]['prefilled']):<7.0f} | {on:6.2f} / {off:<6.2f} | "
              f"{alone:15.2f} | {on / alone:.2f}x")


def report_system(args, median) -> None:
    on_pre, off_pre = (median(c, lambda s: s["system"]["prefilled"]) for c in (True, False))
    rest = median(True, lambda s: s["system"]["rest_ttft_s"])
    bare = median(True, lambda s: s["system"]["no_system_ttft_s"])
    print(f"\nsystem prompt of {args.system_tokens} tokens, {args.system_users} users: prompt tokens prefilled "
          f"{on_pre:.0f} on / {off_pre:.0f} off ({1 - on_pre / off_pre:.0%} fewer); users 2-{args.system_users} "
          f"TTFT {rest:.2f} s on, {median(False, lambda s: s['system']['rest_ttft_s']):.2f} s off, "
          f"{bare:.2f} s with no system prompt ({rest / bare:.2f}x)")


def report_cold(result: dict) -> None:
    ratios = {key: [a["cold"][key] / b["cold"][key] for a, b in zip(result["rounds"][0::2], result["rounds"][1::2])]
              for key in ("ttft_s", "decode_ms")}
    flips = [1 if side["cache"] else -1 for side in result["rounds"][0::2]]  # on/off per round, whichever ran first
    for key, values in ratios.items():
        on_off = [v if f == 1 else 1 / v for v, f in zip(values, flips)]
        print(f"no shared prefix, {key}: on / off per round " + ", ".join(f"{x:.3f}" for x in on_off))


if __name__ == "__main__":
    sys.exit(main())
