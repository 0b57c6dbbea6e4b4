"""`gptj-tvm compile`: a HF checkpoint in, an artifact folder out.

Two independent halves: the library is built from the config alone (frontend -> ir -> schedules -> codegen),
and the weights are converted with numpy/safetensors only (frontend.weights). Both land in a staging folder
that is renamed into place when everything has been written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import tvm
from tqdm import tqdm

from gptj_tvm.errors import GptjError
from gptj_tvm.files import staging_dir
from gptj_tvm.frontend.config import COLUMN_PAIRS, DTYPES, PREFILL_BUCKETS, ROWS, GPTJConfig
from gptj_tvm.frontend.quantization import check_scheme
from gptj_tvm.frontend.checkpoint_files import CheckpointFiles
from gptj_tvm.frontend.hf_tokenizer import build_tokenizer, stop_token_ids
from gptj_tvm.frontend.weights import Checkpoint
from gptj_tvm.ir import pipeline
from gptj_tvm.runtime import artifact
from gptj_tvm.schedules.database import TuningDatabase
from gptj_tvm.schedules.default import schedule_kernels

from . import cuda, vulkan
from .convert import write_weights
from .host import has_vnni
from .resolve import device_name, is_gpu, resolve_target, tuning_fingerprint


def variant_for(target: tvm.target.Target, dtype: str = "float32", tuned: bool = False):
    """The model variant (weight layout, attention kernel form) a target runs. A CPU's bfloat16 GEMMs read
    column pairs (frontend/pair_gemm.py), except with a tuning database (`tuned`): MetaSchedule tunes the
    column-tile GEMMs (schedules/tune.py), which the hand-written pair kernels leave it nothing to tune in."""
    from gptj_tvm.frontend import model

    if is_gpu(target):
        return model.GPU
    return model.CPU_PAIRS if dtype == "bfloat16" and not tuned else model.CPU


def export_model(config: GPTJConfig, dtype: str, fuse_block: bool = True, variant=None,
                 prefill_buckets: tuple[int, ...] = ()):
    """The Relax module of GPT-J for `config` in `dtype` (with a static `prefill_B` for each bucket B), and
    its parameter names in call order."""
    from gptj_tvm.frontend.model import CPU, GPTJ

    model = pipeline.model_passes(fuse_block)(GPTJ(config, dtype, variant or CPU))
    mod, params = model.export_tvm(spec=model.get_default_spec(prefill_buckets))
    return mod, [name for name, _ in params]


def build_library(config: GPTJConfig, dtype: str, target: tvm.target.Target, out_path: Path,
                  fuse_block: bool = True, tuned=None, variant=None,
                  prefill_buckets: tuple[int, ...] = ()) -> tuple[list[str], dict, dict]:
    """Compile GPT-J for target and export the library to out_path; returns the parameter order, what
    schedule each kernel got (tuned ones from `tuned`, a MetaSchedule database, where it has them) and the
    kernels decode and prefill call, in order (what runs, counted from the compiled graph). On a GPU
    every kernel must come out bound to threads; the device code is built with nvcc (targets/cuda.py)."""
    from gptj_tvm.frontend.model import bucket_function

    mod, param_names = export_model(config, dtype, fuse_block, variant or variant_for(target, dtype, tuned is not None),
                                    prefill_buckets)
    report: dict[str, str] = {}
    calls: dict[str, list[str]] = {}

    def schedule(module):
        scheduled, kinds = schedule_kernels(module, target, tuned)
        report.update(kinds)
        functions = ("decode", "prefill", *(bucket_function(b) for b in prefill_buckets))
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


def prepare(model_dir, target: str, dtype: str | None,
            arch: str | None = None) -> tuple[Path, GPTJConfig, str, tvm.target.Target]:
    """Checks shared by compile and tune: the checkpoint's config, the dtype, the target."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GptjError(f"{model_dir}: no such checkpoint folder")
    config = GPTJConfig.from_file(model_dir / "config.json")
    for warning in config.warnings():
        print(f"warning: config.json: {warning}", file=sys.stderr)
    dtype = dtype or config.torch_dtype or weights_dtype(model_dir)
    if dtype not in DTYPES:
        raise GptjError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tvm_target = resolve_target(target, arch)
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


def tune_model(model_dir, out, target: str = "llvm", dtype: str | None = None, fuse_block: bool = True,
               trials: int = 64, max_seconds: float | None = None, progress: bool = True,
               arch: str | None = None, prefill_buckets: tuple[int, ...] | None = None) -> dict:
    """`gptj-tvm tune`: the GEMMs of this model's decode step and of its prefill at each bucket length
    (default: PREFILL_BUCKETS up to the context), tuned for this target, into the database at out."""
    from gptj_tvm.schedules.tune import tune

    _, config, dtype, tvm_target = prepare(model_dir, target, dtype, arch)
    if tvm_target.kind.name != "llvm":
        raise GptjError(f"tune knows this host's CPU (--target llvm) only for now, not {target!r}: "
                        "compile for it with its default schedules")
    buckets = check_buckets(prefill_buckets, config)
    mod = pipeline.optimize(export_model(config, dtype, fuse_block, variant_for(tvm_target, dtype, tuned=True),
                                         buckets)[0], tvm_target)
    return tune(mod, tvm_target, tuning_fingerprint(tvm_target, dtype), Path(out), trials=trials,
                max_seconds=max_seconds, progress=progress, prefill_buckets=buckets)


def check_buckets(buckets, config: GPTJConfig) -> tuple[int, ...]:
    """The prefill buckets, sorted, each between 2 and the context; None: PREFILL_BUCKETS within the context."""
    if buckets is None:
        return tuple(b for b in PREFILL_BUCKETS if b <= config.n_positions)
    buckets = tuple(sorted(set(int(b) for b in buckets)))
    if any(not 2 <= b <= config.n_positions for b in buckets):
        raise GptjError(f"prefill buckets must be between 2 and the context ({config.n_positions}) tokens, "
                        f"not {', '.join(map(str, buckets))}")
    return buckets


def compile_model(model_dir, out_dir, target: str = "llvm", dtype: str | None = None,
                  fuse_block: bool = True, tuning_db=None, progress: bool = True, arch: str | None = None,
                  weights: bool = True, quantization: str | None = None, vnni: bool | None = None,
                  variant=None, prefill_buckets: tuple[int, ...] | None = None) -> dict:
    """`gptj-tvm compile`: library, converted weights (unless weights=False: `convert-weights` adds them
    later), tokenizer and metadata. `variant` (frontend.model.Variant) overrides the target's own, for tests:
    the GPU variant compiled for the CPU runs the GPU kernels' math here. `vnni` (quantized artifacts): integer
    dot-product GEMMs; by default where this CPU has AVX-512 VNNI. `prefill_buckets`: lengths B that get a
    static `prefill_B` (default: PREFILL_BUCKETS for float CPU artifacts, else none), besides a tuning
    database's."""
    from gptj_tvm.frontend.model import bucket_function

    out_dir = Path(out_dir)
    model_dir, config, dtype, tvm_target = prepare(model_dir, target, dtype, arch)
    tuned, tuned_buckets = open_tuning_db(tuning_db, tvm_target, dtype) if tuning_db else (None, ())
    if quantization is not None:
        check_scheme(quantization)
        variant = variant or variant_for(tvm_target)  # quantized linears have their own layout
        if variant.weight_layout == ROWS:
            raise GptjError(f"--quantization is for CPU artifacts (--target llvm) for now, not {target!r}")
        vnni = has_vnni() if vnni is None else vnni
        variant = dataclasses.replace(variant, quantization=quantization, vnni=vnni)
    variant = variant or variant_for(tvm_target, dtype, tuned is not None)
    checkpoint = Checkpoint(model_dir, config) if weights else None  # checks names and shapes before long work
    tokenizer, tokenizer_info = build_tokenizer(model_dir)
    if prefill_buckets is None and (is_gpu(tvm_target) or variant.quantization
                                    or variant.weight_layout == COLUMN_PAIRS):
        # CPU float GEMMs in column tiles (schedules/cpu_matmul.py) run prefill 1.7x faster on static lengths
        # (no ragged row blocks); the hand-written ones (pair_gemm.py, x86_gemm.py, cpu_quant.py) and GPU
        # kernels gain nothing from them
        prefill_buckets = ()
    own = check_buckets(prefill_buckets, config)  # None: the defaults
    buckets = check_buckets([*own, *(b for b in tuned_buckets if b <= config.n_positions)], config)
    artifact.check_replaceable(out_dir)
    with staging_dir(out_dir) as staging:
        start = time.perf_counter()
        with tqdm(total=1, desc="compile library", disable=not progress, leave=False) as bar:
            params, kernels, calls = build_library(config, dtype, tvm_target, staging / artifact.LIBRARY,
                                                   fuse_block, tuned, variant, buckets)
            bar.update()
        timings = {"library_s": time.perf_counter() - start}
        tokenizer.save(str(staging / artifact.TOKENIZER))
        meta = dict(config=config.to_dict(), dtype=dtype, target=json.loads(str(tvm_target)),
                    device=device_name(tvm_target), tvm_version=tvm.__version__, params=params,
                    stop_token_ids=stop_token_ids(model_dir, config, tokenizer),
                    functions=["prefill", "prefill_all", "decode", *(bucket_function(b) for b in buckets)],
                    extra={"fuse_block": fuse_block, "weight_layout": variant.weight_layout,
                           "quantization": variant.quantization,
                           "quantized_gemm": ("vnni" if variant.vnni else "float32") if variant.quantization else None,
                           "kernels": kernels,
                           "kernel_calls": calls, "compile_timings": timings,
                           "device_features": vulkan.required_features(dtype) if device_name(tvm_target) == "vulkan"
                           else [],
                           "tuning_db": str(tuning_db) if tuned is not None else None,
                           # what compile read: weight format, files, dtype, buffers ignored; the tokenizer's files
                           "source": {**(checkpoint.summary() if checkpoint else {}), "tokenizer": tokenizer_info},
                           # the runtime prefills a prompt in chunks of these lengths (largest first)
                           "prefill_buckets": {str(b): bucket_function(b) for b in buckets}})
        files = None
        if weights:
            files, timings["weights_s"] = write_weights(checkpoint, {**meta, **meta["extra"]}, staging, progress)
        return artifact.write_metadata(staging, weight_files=files, **meta)
