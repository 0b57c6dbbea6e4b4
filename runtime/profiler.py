"""Per-call timing of what a VM function runs (compiled kernels and runtime builtins), with TVM's runtime only.

Uses the VM's instrument hook, so every Call instruction is seen: the compiled PrimFuncs and the packed
functions behind them (KV-cache append/view, ...). The timings include the hook's own small overhead.
"""

from __future__ import annotations

import time
from typing import Callable

from tvm.runtime.vm import VirtualMachine


class CallRecorder:
    """Records (callee symbol, seconds, measure(symbol, args) or None) for every call, in call order."""

    def __init__(self, measure: Callable[[str, tuple], object] | None = None):
        self.calls: list[tuple[str, float, object]] = []
        self._start: dict[str, tuple[float, object]] = {}
        self._measure = measure

    def __call__(self, _func, symbol, before_run, _ret, *args):
        if before_run:
            measured = self._measure(symbol, args) if self._measure else None
            self._start[symbol] = (time.perf_counter(), measured)
        else:
            now = time.perf_counter()
            start, measured = self._start.pop(symbol, (now, None))
            self.calls.append((symbol, now - start, measured))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual


def record_calls(vm: VirtualMachine, function: str, *args, measure=None):
    """Runs vm[function](*args) once; returns (its result, [(callee symbol, seconds, measure(symbol, call
    arguments) or None), ...] in call order). `measure` runs before each call, outside its timing."""
    recorder = CallRecorder(measure)
    vm.set_instrument(recorder)
    try:
        result = vm[function](*args)
    finally:
        vm.set_instrument(None)
    return result, recorder.calls
