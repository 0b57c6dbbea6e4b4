"""The library half of a compile: the model's Relax graph for a target, through the pipeline's phases, to a
compiled library (frontend -> ir -> schedules -> targets' code generation)."""

from __future__ import annotations

import sys
from pathlib import Path

import tvm

from gptj_tvm.core.errors import GptjError
from gptj_tvm.frontend.checkpoint_files import CheckpointFiles
from gptj_tvm.frontend.config import DTYPES, GPTJConfig
from gptj_tvm.frontend.layouts import LM_HEAD, LayoutPlan, check_scheme
from gptj_tvm.ir import pipeline
from gptj_tvm.schedules.database import TuningDatabase
from gptj_tvm.schedules.default import schedule_kernels
from gptj_tvm.targets import cuda, vulkan
from gptj_tvm.targets.host import has_avx512_bf16, has_vnni
from gptj_tvm.targets.resolve import is_gpu, resolve_target, tuning_fingerprint

from .options import CPU, GPU, BuildOptions, Variant


def variant_for(target: tvm.target.Target, dtype: str = "float32", tuned: bool = False,
                quantization: str | None = None, vnni: bool | None = None, bf16_dot: bool | None = None) -> Variant:
    """The graph a target runs. A CPU's bfloat16 GEMMs read column pairs (kernels/pair_gemm.py), except with a
    tuning database (`tuned`): MetaSchedule tunes the column-tile GEMMs, which the hand-written pair kernels
    leave it nothing to tune in. Quantized blocks (CPU only) take q8 or q4 and lm_head q8; their GEMMs run on
    VNNI dot products where `vnni`, and bfloat16 pair GEMMs on vdpbf16ps where `bf16_dot` (default: where this
    CPU has them; the artifact then needs a CPU that has them, as it needs every ISA feature of its host)."""
    if is_gpu(target):
        if quantization is not None:
            raise GptjError(f"--quantization is for CPU artifacts (--target llvm) for now, not {target.kind.name!r}")
        return GPU
    if quantization is not None:
        check_scheme(quantization)
        return Variant(layouts=LayoutPlan(quantization, LM_HEAD, has_vnni() if vnni is None else vnni))
    if dtype == "bfloat16" and not tuned:
        dot = has_avx512_bf16() if bf16_dot is None else bf16_dot
        return Variant(layouts=LayoutPlan("column-pairs", "column-pairs", bf16_dot=dot))
    return CPU


def export_model(config: GPTJConfig, dtype: str, fuse_block: bool = True, variant: Variant = CPU,
                 prefill_buckets: tuple[int, ...] = (), batched: bool = False):
    """The Relax module of GPT-J for `config` in `dtype` (with a static `prefill_B` for each bucket B, and with
    `batched` the serving engine's `step`), and its parameter names in call order."""
    from gptj_tvm.frontend.model import GPTJ

    model = pipeline.model_passes(fuse_block, variant.layouts)(GPTJ(config, dtype, variant.gpu_loops))
    mod, params = model.export_tvm(spec=model.get_default_spec(prefill_buckets, batched))
    return mod, [name for name, _ in params]


def build_library(config: GPTJConfig, dtype: str, target: tvm.target.Target, out_path: Path, variant: Variant,
                  fuse_block: bool = True, tuned=None, prefill_buckets: tuple[int, ...] = (),
                  batched: bool = False) -> tuple[list[str], dict, dict]:
    """Compile GPT-J for target and export the library to out_path; returns the parameter order, what
    schedule each kernel got (tuned ones from `tuned`, a MetaSchedule database, where it has them) and the
    kernels decode and prefill call, in order (what runs, counted from the compiled graph). On a GPU
    every kernel must come out bound to threads; the device code is built with nvcc (targets/cuda.py)."""
    from gptj_tvm.frontend.model import bucket_function

    mod, param_names = export_model(config, dtype, fuse_block, variant, prefill_buckets, batched)
    report: dict[str, str] = {}
    calls: dict[str, list[str]] = {}

    def schedule(module):
        scheduled, kinds = schedule_kernels(module, target, tuned)
        report.update(kinds)
        functions = ("decode", "prefill", *(bucket_function(b) for b in prefill_buckets),
                     *(("step",) if batched else ()))
        calls.update({fn: pipeline.kernel_calls(scheduled, fn) for fn in functions})
        if is_gpu(target):
            cuda.require_thread_bound(scheduled)
        return scheduled

    executable = pipeline.build(mod, target, schedule)
    if target.kind.name == "cuda":
        cuda.export_library(executable, out_path, str(target.attrs["arch"]))
    elif target.kind.name == "webgpu":
        vulkan.check_limits(executable)
        executable.export_library(str(out_path))
    else:
        executable.export_library(str(out_path))
    return param_names, report, calls


def open_tuning_db(path, target: tvm.target.Target, dtype: str):
    """(the tuning database as a MetaSchedule database, its prefill buckets), or (None, ()) with a warning if
    it was made elsewhere."""
    ours = tuning_fingerprint(target, dtype)
    db = TuningDatabase.open(path, ours, create=False)
    if not db.matches(ours):
        theirs = db.fingerprint
        differs = ", ".join(k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
        print(f"warning: ignoring tuning database {path}: it was tuned for another {differs} "
              f"({theirs.get('cpu', theirs.get('kind'))}); using default schedules", file=sys.stderr)
        return None, ()
    return db.to_memory_database(), tuple(db.prefill_buckets)


def prepare(model_dir, options: BuildOptions) -> tuple[Path, GPTJConfig, str, tvm.target.Target]:
    """Checks shared by compile and tune: the checkpoint's config, the dtype, the target."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GptjError(f"{model_dir}: no such checkpoint folder")
    config = GPTJConfig.from_file(model_dir / "config.json")
    for warning in config.warnings():
        print(f"warning: config.json: {warning}", file=sys.stderr)
    dtype = options.dtype or config.torch_dtype or weights_dtype(model_dir)
    if dtype not in DTYPES:
        raise GptjError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tvm_target = resolve_target(options.target, options.arch)
    if tvm_target.kind.name == "webgpu":
        vulkan.check_dtype(dtype)
    return model_dir, config, dtype, tvm_target


def weights_dtype(model_dir: Path) -> str:
    """The dtype of a checkpoint's weights (its embedding's), for a config that names none; float32 (what
    transformers loads by default) where the folder has no weights yet."""
    try:
        return CheckpointFiles(model_dir).dtype
    except GptjError:
        return "float32"
