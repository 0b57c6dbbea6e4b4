"""`gptj-tvm tune`: the model's GEMMs tuned for this target with MetaSchedule (schedules/tune.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from gptj_tvm.core.errors import GptjError
from gptj_tvm.ir import pipeline
from gptj_tvm.targets.host import cpu_flags
from gptj_tvm.targets.llvm import target_isa
from gptj_tvm.targets.resolve import tuning_fingerprint

from .build import export_model, prepare, variant_for
from .options import TuneOptions, check_buckets


def tune_model(model_dir, out, options: TuneOptions | None = None, **changes) -> dict:
    """The GEMMs of this model's decode step and of its prefill at each bucket length (default: PREFILL_BUCKETS
    up to the context), tuned for this target, into the database at out. `changes` override `options`."""
    from gptj_tvm.schedules.tune import tune

    options = dataclasses.replace(options or TuneOptions(), **changes)
    # --max-seconds bounds the whole run: building the graph and timing the default schedules count too
    deadline = None if options.max_seconds is None else time.monotonic() + options.max_seconds
    _, config, dtype, tvm_target = prepare(model_dir, options)
    if tvm_target.kind.name != "llvm":
        raise GptjError(f"tune knows this host's CPU (--target llvm) only for now, not {options.target!r}: "
                        "compile for it with its default schedules")
    missing = sorted(target_isa(tvm_target) - cpu_flags())
    if missing:  # MetaSchedule times every candidate on this CPU
        raise GptjError(f"tune runs its candidates on this CPU, which lacks {', '.join(missing)} of "
                        f"--target {options.target!r}: tune on a CPU of that kind")
    buckets = check_buckets(options.prefill_buckets, config)
    mod = pipeline.optimize(export_model(config, dtype, options.fuse_block,
                                         variant_for(tvm_target, dtype, tuned=True), buckets)[0], tvm_target)
    return tune(mod, tvm_target, tuning_fingerprint(tvm_target, dtype), Path(out), trials=options.trials,
                deadline=deadline, progress=options.progress, prefill_buckets=buckets)


def describe_tuning(comparison: dict) -> str:
    """tune's closing line: what compile --tuning-db would change, per token, measured interleaved."""
    if comparison is None:
        return "what it changes: not measured (--max-seconds had passed)"
    if not comparison:
        return "what it changes: nothing here (no tuned kernel beats its default schedule)"
    parts = []
    for phase, c in comparison.items():
        ms_a, ms_b = c["a_median"], c["b_median"]
        advice = ("worth using" if c["ratio_range"][1] < 1.0 else "costs time: compile without it"
                  if c["ratio_range"][0] > 1.0 else "no clear difference")
        kernels = f"{c['kernels']} kernel{'s' if c['kernels'] > 1 else ''}"
        parts.append(f"{phase} GEMMs ({kernels}) {ms_b:.3f} ms per token tuned vs {ms_a:.3f} default, "
                     f"{c['ratio_median']:.2f}x (rounds {c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f}): "
                     f"{advice}")
    return "what it changes, interleaved: " + "; ".join(parts)
