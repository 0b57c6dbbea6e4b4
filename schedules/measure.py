"""Timing one kernel alone on this machine (random inputs, TVM's time_evaluator), to compare schedules."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm

from .database import workload_module


def random_args(func: tvm.tirx.PrimFunc, rng: np.random.Generator, dynamic: int = 1, scalar: int = 1) -> list:
    """Arguments for func: random tensors (symbolic dims set to `dynamic`), `scalar` for scalar parameters."""
    args = []
    for param in func.params:
        ty = param.ty
        if not hasattr(ty, "shape"):
            args.append(scalar)
            continue
        shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else dynamic for s in ty.shape]
        dtype = str(ty.dtype)
        values = rng.standard_normal(shape) * 0.1
        args.append(tvm.runtime.tensor(values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)))
    return args


def time_ms(func: tvm.tirx.PrimFunc, target: tvm.target.Target, args: list, repeat: int = 5) -> float:
    """Best of `repeat` runs (each the mean of 3 calls), in milliseconds."""
    with target:
        lib = tvm.tirx.build(workload_module(func), target=target)
    timer = lib.time_evaluator("main", tvm.cpu(), number=3, repeat=repeat)
    return 1e3 * min(timer(*args).results)
