"""What every benchmark script ends with: its result as JSON under benchmarks/results/ (or --out)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def write_result(result: dict, path) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def time_kernels(libs: dict, inputs: list, out, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each built kernel in libs (name -> module with "main") on the same inputs, round by
    round (ABAB), each round after a first call: name -> one figure a round."""
    times = {name: [] for name in libs}
    for _ in range(rounds):
        for name, lib in libs.items():
            lib["main"](*inputs, out)
            start = time.perf_counter()
            for _ in range(repeats):
                lib["main"](*inputs, out)
            times[name].append((time.perf_counter() - start) / repeats)
    return times
