"""Timing one kernel alone on this machine (random inputs, TVM's time_evaluator), to compare schedules."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tvm

from .database import workload_module


def random_args(func: tvm.tirx.PrimFunc, rng: np.random.Generator, dynamic: int = 1, scalar: int = 1,
                sizes: dict[str, int] | None = None) -> list:
    """Arguments for func: random tensors (a symbolic dim named in `sizes` set to that size, any other to
    `dynamic`), `scalar` for scalar parameters. A kernel that indexes a dim by a scalar (the attention kernels'
    KV cache `capacity` by `total`) needs that dim in `sizes`: it would write past a smaller tensor."""
    sizes = sizes or {}
    args = []
    for param in func.params:
        ty = param.ty
        if not hasattr(ty, "shape"):
            args.append(scalar)
            continue
        shape = [int(s) if isinstance(s, tvm.tirx.IntImm) else sizes.get(getattr(s, "name", None), dynamic)
                 for s in ty.shape]
        dtype = str(ty.dtype)
        values = rng.standard_normal(shape) * 0.1
        args.append(tvm.runtime.tensor(values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)))
    return args


def kernel_timer(func: tvm.tirx.PrimFunc, target: tvm.target.Target, repeat: int = 10):
    """func built for target: a callable(args) -> the best of `repeat` calls in milliseconds, each after
    flushing every argument but the first (the input vector) from the caches: a server's last-level cache can
    hold one weight matrix (hundreds of MiB on a Xeon), but a decode step's 28 layers never fit, so a kernel is
    timed reading its weights from memory."""
    with target:
        lib = tvm.tirx.build(workload_module(func), target=target)
    # the flush walks every argument as a tensor: a kernel with scalar arguments is timed without it
    flush = all(hasattr(param.ty, "shape") for param in func.params)
    timer = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat,
                               f_preproc="cache_flush_cpu_non_first_arg" if flush else "")
    return lambda args: 1e3 * min(timer(*args).results)


def time_ms(func: tvm.tirx.PrimFunc, target: tvm.target.Target, args: list, repeat: int = 10) -> float:
    """func's time on args, as kernel_timer measures it."""
    return kernel_timer(func, target, repeat)(args)
