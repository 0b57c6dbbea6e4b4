"""Per-call timing of what a VM function runs (compiled kernels and runtime builtins), with TVM's runtime only.

Uses the VM's instrument hook, so every Call instruction is seen: the compiled PrimFuncs and the packed
functions behind them (KV-cache append/view, ...). The timings include the hook's own small overhead.
"""

from __future__ import annotations

import time
from collections import defaultdict

from tvm.runtime.vm import VirtualMachine


class CallRecorder:
    def __init__(self):
        self.calls: list[tuple[str, float]] = []
        self._start: dict[str, float] = {}

    def __call__(self, _func, symbol, before_run, _ret, *_args):
        now = time.perf_counter()
        if before_run:
            self._start[symbol] = now
        else:
            self.calls.append((symbol, now - self._start.pop(symbol, now)))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual


def record_calls(vm: VirtualMachine, function: str, *args):
    """Runs vm[function](*args) once; returns (its result, [(callee symbol, seconds), ...] in call order)."""
    recorder = CallRecorder()
    vm.set_instrument(recorder)
    try:
        result = vm[function](*args)
    finally:
        vm.set_instrument(None)
    return result, recorder.calls


def summarize(calls: list[tuple[str, float]]) -> list[dict]:
    """Calls grouped by symbol, slowest total first."""
    totals: dict[str, list[float]] = defaultdict(list)
    for symbol, seconds in calls:
        totals[symbol].append(seconds)
    rows = [{"name": name, "calls": len(times), "total_ms": 1e3 * sum(times)} for name, times in totals.items()]
    return sorted(rows, key=lambda row: -row["total_ms"])
