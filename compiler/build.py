"""The library half of a compile: the model's Relax graph for a target, through the pipeline's phases, to a
compiled library (frontend -> ir -> schedules -> targets' code generation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tvm
from tvm import relax

from gptj_tvm.core.errors import GptjError
from gptj_tvm.frontend.checkpoint_files import CheckpointFiles
from gptj_tvm.frontend.config import DTYPES, GPTJConfig
from gptj_tvm.frontend.layouts import INT8_DOTS, LM_HEAD, LayoutPlan, check_scheme
from gptj_tvm.ir import pipeline
from gptj_tvm.runtime.artifact import MANIFEST_FUNCTION, library_manifest
from gptj_tvm.schedules.database import TuningDatabase
from gptj_tvm.schedules.default import schedule_kernels
from gptj_tvm.targets import cuda, vulkan
from gptj_tvm.targets.host import has_avx512_bf16
from gptj_tvm.targets.llvm import target_isa
from gptj_tvm.targets.resolve import is_gpu, resolve_target, tuning_fingerprint

from .options import CPU, GPU, BuildOptions, Variant


def variant_for(target: tvm.target.Target, dtype: str = "float32", tuned: bool = False,
                quantization: str | None = None, int8_dot: str | None = None,
                bf16_dot: bool | None = None) -> Variant:
    """The graph a target runs, its GEMMs chosen by the target's ISA features (targets/llvm.target_isa), not the
    host's. A CPU's bfloat16 GEMMs read column pairs (tir_kernels/pair_gemm.py), except with a tuning database
    (`tuned`): MetaSchedule tunes the column-tile GEMMs, which the hand-written pair kernels leave it nothing to
    tune in. Quantized blocks (CPU only) take q8 or q4 and lm_head q8; their GEMMs run on `int8_dot` (one of
    INT8_DOTS, "float32" to widen the levels; default: the best the target has), and bfloat16 pair GEMMs on
    vdpbf16ps where `bf16_dot` (default: where the target has AVX512_BF16). Asking for an instruction the target
    lacks is an error here, before LLVM sees it."""
    if is_gpu(target):
        if quantization is not None:
            raise GptjError(f"--quantization is for CPU artifacts (--target llvm) for now, not {target.kind.name!r}")
        return GPU
    isa = target_isa(target)
    if quantization is not None:
        check_scheme(quantization)
        return Variant(layouts=LayoutPlan(quantization, LM_HEAD, choose_int8_dot(target, isa, int8_dot)))
    if dtype == "bfloat16" and not tuned:
        if bf16_dot and not has_avx512_bf16(isa):
            raise GptjError(f"vdpbf16ps needs AVX512_BF16, which the target ({describe_cpu(target)}) lacks")
        dot = has_avx512_bf16(isa) if bf16_dot is None else bf16_dot
        return Variant(layouts=LayoutPlan("column-pairs", "column-pairs", bf16_dot=dot,
                                          vector_bits=512 if "avx512f" in isa else 256))
    return CPU


QUANTIZED_GEMMS = (*INT8_DOTS, "float32")  # what --quantized-gemm takes


def choose_int8_dot(target: tvm.target.Target, isa: frozenset[str], asked: str | None) -> str:
    """The plan's int8_dot for `asked` (None: the best INT8_DOTS the target has; "float32": "", widening)."""
    if asked == "float32":
        return ""
    if asked is None:
        return next((name for name, needs in INT8_DOTS.items() if set(needs) <= isa), "")
    if asked not in INT8_DOTS:
        raise GptjError(f"unknown quantized GEMM {asked!r}: choose one of {', '.join(QUANTIZED_GEMMS)}")
    missing = [flag for flag in INT8_DOTS[asked] if flag not in isa]
    if missing:
        raise GptjError(f"the {asked} GEMM needs {', '.join(missing)}, which the target ({describe_cpu(target)}) "
                        "lacks: pick another --quantized-gemm or a --target with it")
    return asked


def describe_cpu(target: tvm.target.Target) -> str:
    mattr = ",".join(str(a) for a in target.attrs.get("mattr", []))
    return f"-mcpu={target.attrs.get('mcpu', '?')}" + (f" -mattr={mattr}" if mattr else "")


def export_model(config: GPTJConfig, dtype: str, fuse_block: bool = True, variant: Variant = CPU,
                 prefill_buckets: tuple[int, ...] = (), batched: bool = False):
    """The Relax module of GPT-J for `config` in `dtype` (with a static `prefill_B` for each bucket B, and with
    `batched` the serving engine's `step`), and its parameters in call order (name -> shape, dtype)."""
    from gptj_tvm.frontend.model import GPTJ

    model = pipeline.model_passes(fuse_block, variant.layouts)(GPTJ(config, dtype, variant.gpu_loops))
    mod, params = model.export_tvm(spec=model.get_default_spec(prefill_buckets, batched))
    return mod, {name: ([int(n) for n in param.shape], str(param.dtype)) for name, param in params}


def build_library(config: GPTJConfig, dtype: str, target: tvm.target.Target, out_path: Path, variant: Variant,
                  fuse_block: bool = True, tuned=None, prefill_buckets: tuple[int, ...] = (),
                  batched: bool = False) -> tuple[list[str], dict, dict]:
    """Compile GPT-J for target and export the library to out_path; returns the parameter order, what
    schedule each kernel got (tuned ones from `tuned`, a MetaSchedule database, where it has them) and the
    kernels decode and prefill call, in order (what runs, counted from the compiled graph). On a GPU
    every kernel must come out bound to threads; the device code is built with nvcc (targets/cuda.py)."""
    from gptj_tvm.frontend.config import exported_functions

    mod, params = export_model(config, dtype, fuse_block, variant, prefill_buckets, batched)
    manifest = library_manifest(config, dtype, variant.layouts.to_dict(), fuse_block,
                                exported_functions(prefill_buckets, batched), params)
    mod[MANIFEST_FUNCTION] = relax.Function([], tvm.ir.StringImm(json.dumps(manifest))).with_attr(
        "global_symbol", MANIFEST_FUNCTION)
    report: dict[str, str] = {}
    calls: dict[str, list[str]] = {}

    def schedule(module):
        scheduled, kinds = schedule_kernels(module, target, tuned)
        report.update(kinds)
        calls.update({fn: pipeline.kernel_calls(scheduled, fn) for fn in exported_functions(prefill_buckets, batched)})
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
    return list(params), report, calls


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
