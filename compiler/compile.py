"""`gptj-tvm compile`: a HF checkpoint in, an artifact folder out.

Two independent halves: the library is built from the config alone (compiler/build.py), and the weights are
converted with numpy/safetensors only (compiler/convert.py). Both land in a staging folder that is renamed
into place when everything has been written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import tvm
from tqdm import tqdm

from gptj_tvm.core.files import staging_dir
from gptj_tvm.frontend.hf_tokenizer import build_tokenizer, stop_token_ids
from gptj_tvm.frontend.weights import Checkpoint
from gptj_tvm.runtime import artifact
from gptj_tvm.runtime.artifact import ArtifactMetadata
from gptj_tvm.targets import vulkan
from gptj_tvm.targets.llvm import target_isa
from gptj_tvm.targets.resolve import device_name, is_gpu

from .build import build_library, open_tuning_db, prepare, variant_for
from .convert import write_weights
from .options import CompileOptions, check_buckets


def compile_model(model_dir, out_dir, options: CompileOptions | None = None, **changes) -> ArtifactMetadata:
    """`gptj-tvm compile`: library, converted weights (unless options.weights is False: `convert-weights` adds
    them later), tokenizer and metadata. `changes` override fields of `options` (CompileOptions)."""
    from gptj_tvm.frontend.config import bucket_function, exported_functions

    options = dataclasses.replace(options or CompileOptions(), **changes)
    out_dir = Path(out_dir)
    model_dir, config, dtype, tvm_target = prepare(model_dir, options)
    tuned, tuned_buckets = open_tuning_db(options.tuning_db, tvm_target, dtype) if options.tuning_db else (None, ())
    variant = variant_for(tvm_target, dtype, tuned is not None, options.quantization, options.quantized_gemm,
                          options.bf16_dot)
    if options.variant is not None:
        variant = dataclasses.replace(options.variant, layouts=variant.layouts) if options.quantization \
            else options.variant
    checkpoint = Checkpoint(model_dir, config) if options.weights else None  # names and shapes, before long work
    tokenizer, tokenizer_info = build_tokenizer(model_dir)
    prefill_buckets = options.prefill_buckets
    if prefill_buckets is None and (is_gpu(tvm_target) or variant.layouts.quantization
                                    or variant.layouts.blocks == "column-pairs"):
        # CPU float GEMMs in column tiles (schedules/cpu_matmul.py) run prefill 1.7x faster on static lengths
        # (no ragged row blocks); the hand-written ones (pair_gemm.py, vnni_gemm.py), the quantized GEMMs
        # (cpu_quant.py) and GPU kernels gain nothing from them
        prefill_buckets = ()
    own = check_buckets(prefill_buckets, config)  # None: the defaults
    buckets = check_buckets([*own, *(b for b in tuned_buckets if b <= config.n_positions)], config)
    # the serving engine's batched step (runtime/executors.py): CPUs and CUDA; the Vulkan bridge runs one sequence
    batched = tvm_target.kind.name in ("llvm", "cuda")
    artifact.check_replaceable(out_dir)
    with staging_dir(out_dir) as staging:
        start = time.perf_counter()
        with tqdm(total=1, desc="compile library", disable=not options.progress, leave=False) as bar:
            params, kernels, calls = build_library(config, dtype, tvm_target, staging / artifact.LIBRARY, variant,
                                                   options.fuse_block, tuned, buckets, batched)
            bar.update()
        timings = {"library_s": time.perf_counter() - start}
        tokenizer.save(str(staging / artifact.TOKENIZER))
        device = device_name(tvm_target)
        meta = ArtifactMetadata(
            config=config, dtype=dtype, target=json.loads(str(tvm_target)), device=device,
            tvm_version=tvm.__version__, params=params,
            functions=exported_functions(buckets, batched),
            stop_token_ids=stop_token_ids(model_dir, config, tokenizer),
            fuse_block=options.fuse_block, layouts=variant.layouts.to_dict(),
            # the runtime prefills a prompt in chunks of these lengths (largest first)
            prefill_buckets={str(b): bucket_function(b) for b in buckets},
            kernels=kernels, kernel_calls=calls, compile_timings=timings,
            device_features=vulkan.required_features(dtype) if device == "vulkan" else [],
            tuning_db=str(options.tuning_db) if tuned is not None else None,
            # what compile read: weight format, files, dtype, buffers ignored; the tokenizer's files
            source={**(checkpoint.summary() if checkpoint else {}), "tokenizer": tokenizer_info},
            host_isa=sorted(target_isa(tvm_target)) if device == "cpu" else [])
        files = None
        if checkpoint is not None:
            files, timings["weights_s"] = write_weights(checkpoint, meta, staging, options.progress)
        return meta.save(staging, files)


def describe_source(source: dict) -> str:
    """What compile read, in one line."""
    tokenizer = source["tokenizer"]
    added = f", {tokenizer['added_tokens']} added tokens" if tokenizer["added_tokens"] else ""
    if "format" not in source:
        return f"read config.json (no weights); tokenizer from {tokenizer['source']}{added}"
    files = f"{source['files']} file{'s' if source['files'] > 1 else ''}"
    ignored = f", {source['ignored_buffers']} stored mask buffers ignored" if source["ignored_buffers"] else ""
    return (f"read {source['format']} weights ({files}, {source['dtype']}){ignored}; "
            f"tokenizer from {tokenizer['source']}{added}")
