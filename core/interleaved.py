"""Two things timed round by round: each one's median and range, and whether the per-round ratio lets the
difference be called (`gptj-tvm bench A B`, and `tune`'s tuned-against-default line)."""

from __future__ import annotations

import statistics


def compare(a: list[float], b: list[float]) -> dict:
    """a[r] and b[r] timed in the same round r: each side's median and range, the ratios b/a (below 1: b takes
    less), their median and range, and a verdict: a range that holds 1.0 is too close to call."""
    ratios = [y / x for x, y in zip(a, b)]
    low, high = min(ratios), max(ratios)
    median = statistics.median(ratios)
    if low <= 1.0 <= high:
        verdict = f"too close to call: the rounds' ratios {low:.3f}-{high:.3f} hold 1.0"
    else:
        verdict = (f"B takes {'less' if high < 1.0 else 'more'} time in every round: B/A {median:.3f} "
                   f"(range {low:.3f}-{high:.3f})")
    return {"a": a, "b": b, "a_median": statistics.median(a), "a_range": [min(a), max(a)],
            "b_median": statistics.median(b), "b_range": [min(b), max(b)],
            "ratio": ratios, "ratio_median": median, "ratio_range": [low, high],
            "called": not low <= 1.0 <= high, "verdict": verdict}
