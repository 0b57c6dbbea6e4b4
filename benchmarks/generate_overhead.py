"""`Generator.generate` before and after a runtime change, on one artifact in one process, round by round: what
the change costs a single sequence (here: the engine's schedule and update steps around each decode call).

    python benchmarks/generate_overhead.py ARTIFACT --old-engine OLD_CHECKOUT/runtime/engine.py [--rounds 10]

The old file's `Generator` (the one-sequence loop of before the one engine, be516d9 and earlier) is loaded as a
module of this package and given this process's loaded model (its VM, weights and tokenizer), so both sides run
the same compiled calls on the same weights; each round times both (ABBA order) by the wall clock, prefill of a
short prompt plus every decode step, since the engine's own work sits outside the compiled calls.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time

import gptj_tvm
from gptj_tvm.core.interleaved import compare
from gptj_tvm.runtime import generation, text
from report import write_result


def old_generator(path: str, gen):
    """The old file's Generator over gen's loaded model (its metadata's config as the dict it read then)."""
    generation.held_back = text.held_back  # where the old file imports it from
    spec = importlib.util.spec_from_file_location("gptj_tvm.runtime.old_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    meta = copy.copy(gen.meta)
    meta.config = gen.meta.config.to_dict()
    return module.Generator(gen.folder, meta, gen._vm, gen.device, gen._params, gen.tokenizer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--old-engine", required=True,
                        help="the old runtime/engine.py (git show REV:runtime/engine.py > F)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/generate_overhead.json")
    args = parser.parse_args()
    new = gptj_tvm.load(args.artifact)
    sides = {"old": old_generator(args.old_engine, new), "new": new}
    prompt = list(range(1, 9))
    for gen in sides.values():
        gen.generate(prompt, max_new_tokens=4)
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    ids = {}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            start = time.perf_counter()
            out = sides[side].generate(prompt, max_new_tokens=args.new_tokens)
            seconds[side].append(time.perf_counter() - start)
            ids[side] = out.ids
    assert ids["old"] == ids["new"], "the two generate different tokens"
    verdict = compare(seconds["old"], seconds["new"])
    print(f"{args.artifact}: generate of {args.new_tokens} tokens (8-token prompt), {args.rounds} rounds, ABBA")
    for side in ("old", "new"):
        print(f"  {side}: " + " ".join(f"{s * 1e3:.1f}" for s in seconds[side]) + " ms")
    print("  new/old per round: " + " ".join(f"{x:.4f}" for x in verdict["ratio"]))
    print(f"  new/old median {verdict['ratio_median']:.4f} (range {verdict['ratio_range'][0]:.4f}-"
          f"{verdict['ratio_range'][1]:.4f}): {verdict['verdict']}")
    write_result({"artifact": args.artifact, "new_tokens": args.new_tokens, **verdict}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
