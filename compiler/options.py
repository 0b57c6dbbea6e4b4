"""What a compile or a tune is asked for: option classes in place of keyword chains, shared by the CLI, the
Python API and the tests."""

from __future__ import annotations

import dataclasses

from gptj_tvm.core.errors import GptjError
from gptj_tvm.frontend.config import PREFILL_BUCKETS, GPTJConfig
from gptj_tvm.frontend.layouts import LayoutPlan
from gptj_tvm.tir_kernels.gpu_attention import Loops


@dataclasses.dataclass(frozen=True)
class Variant:
    """What differs between compiled graphs: the attention kernels' form (the CPU's, or the GPU thread-block
    form with these loops) and each linear's layout."""
    gpu_loops: Loops | None = None
    layouts: LayoutPlan = LayoutPlan()


CPU = Variant()
GPU = Variant(Loops(gpu=True), LayoutPlan("rows", "rows"))
GPU_ON_CPU = Variant(Loops(gpu=False), LayoutPlan("rows", "rows"))  # the GPU graph, runnable on a CPU: its math


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Shared by compile and tune: the target, the dtype (None: the checkpoint's) and the graph's form."""
    target: str = "llvm"
    arch: str | None = None  # CUDA: sm_XY (None: the visible GPU's)
    dtype: str | None = None
    fuse_block: bool = True
    prefill_buckets: tuple[int, ...] | None = None  # None: each command's default
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class CompileOptions(BuildOptions):
    tuning_db: str | None = None  # a database from `gptj-tvm tune`
    quantization: str | None = None  # q8, q4 (CPU targets)
    quantized_gemm: str | None = None  # INT8_DOTS or "float32"; None: the best the target has
    bf16_dot: bool | None = None  # bfloat16 pair GEMMs on vdpbf16ps; None: where the target has AVX512_BF16
    weights: bool = True  # False: the library only (`convert-weights` adds the weights)
    variant: Variant | None = None  # None: the target's own; tests compile the GPU graph for a CPU


@dataclasses.dataclass(frozen=True)
class TuneOptions(BuildOptions):
    trials: int = 64  # per task on average
    max_seconds: float | None = None


def check_buckets(buckets, config: GPTJConfig) -> tuple[int, ...]:
    """The prefill buckets, sorted, each between 2 and the context; None: PREFILL_BUCKETS within the context."""
    if buckets is None:
        return tuple(b for b in PREFILL_BUCKETS if b <= config.n_positions)
    buckets = tuple(sorted(set(int(b) for b in buckets)))
    if any(not 2 <= b <= config.n_positions for b in buckets):
        raise GptjError(f"prefill buckets must be between 2 and the context ({config.n_positions}) tokens, "
                        f"not {', '.join(map(str, buckets))}")
    return buckets
