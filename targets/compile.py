"""`gptj-tvm compile`: a HF checkpoint in, an artifact folder out.

Two independent halves: the library is built from the config alone (frontend -> ir -> schedules -> codegen),
and the weights are converted with numpy/safetensors only (frontend.weights). Both land in a staging folder
that is renamed into place when everything has been written.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import tvm
from tqdm import tqdm

from gptj_tvm.errors import GptjError
from gptj_tvm.files import staging_dir
from gptj_tvm.frontend.config import DTYPES, GPTJConfig
from gptj_tvm.frontend.random_checkpoint import packaged_tokenizer_dir
from gptj_tvm.frontend.weights import Checkpoint, write_shards
from gptj_tvm.ir import pipeline
from gptj_tvm.runtime import artifact
from gptj_tvm.schedules.database import TuningDatabase
from gptj_tvm.schedules.default import schedule_kernels

from .resolve import resolve_target, tuning_fingerprint


def export_model(config: GPTJConfig, dtype: str, fuse_block: bool = True):
    """The Relax module of GPT-J for `config` in `dtype`, and its parameter names in call order."""
    from gptj_tvm.frontend.model import GPTJ  # noqa: PLC0415

    model = pipeline.model_passes(fuse_block)(GPTJ(config, dtype))
    mod, params = model.export_tvm(spec=model.get_default_spec())
    return mod, [name for name, _ in params]


def build_library(config: GPTJConfig, dtype: str, target: tvm.target.Target, out_path: Path,
                  fuse_block: bool = True, tuned=None) -> tuple[list[str], dict[str, str]]:
    """Compile GPT-J for target and export the library to out_path; returns the parameter order and what
    schedule each kernel got (tuned ones from `tuned`, a MetaSchedule database, where it has them)."""
    mod, param_names = export_model(config, dtype, fuse_block)
    report: dict[str, str] = {}

    def schedule(module):
        scheduled, kinds = schedule_kernels(module, target, tuned)
        report.update(kinds)
        return scheduled

    executable = pipeline.build(mod, target, schedule)
    executable.export_library(str(out_path))
    return param_names, report


def tokenizer_files(model_dir: Path) -> tuple[Path, Path]:
    """The checkpoint's vocab.json/merges.txt, or the GPT-2 files shipped with the package (GPT-J's own)."""
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return vocab, merges
    shipped = packaged_tokenizer_dir()
    return shipped / "encoder.json", shipped / "vocab.bpe"


def open_tuning_db(path, target: tvm.target.Target, dtype: str):
    """The tuning database as a MetaSchedule database, or None (with a warning) if it was made elsewhere."""
    ours = tuning_fingerprint(target, dtype)
    db = TuningDatabase.open(path, ours, create=False)
    if not db.matches(ours):
        theirs = db.fingerprint
        differs = ", ".join(k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
        print(f"warning: ignoring tuning database {path}: it was tuned for another {differs} "
              f"({theirs.get('cpu', theirs.get('kind'))}); using default schedules", file=sys.stderr)
        return None
    return db.to_memory_database()


def prepare(model_dir, target: str, dtype: str | None) -> tuple[Path, GPTJConfig, str, tvm.target.Target]:
    """Checks shared by compile and tune: the checkpoint's config, the dtype, the target."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GptjError(f"{model_dir}: no such checkpoint folder")
    config = GPTJConfig.from_file(model_dir / "config.json")
    dtype = dtype or config.torch_dtype
    if dtype not in DTYPES:
        raise GptjError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return model_dir, config, dtype, resolve_target(target)


def tune_model(model_dir, out, target: str = "llvm", dtype: str | None = None, fuse_block: bool = True,
               trials: int = 64, max_seconds: float | None = None, progress: bool = True) -> dict:
    """`gptj-tvm tune`: the decode GEMMs of this model, tuned for this target, into the database at out."""
    from gptj_tvm.schedules.tune import tune  # noqa: PLC0415

    _, config, dtype, tvm_target = prepare(model_dir, target, dtype)
    mod = pipeline.optimize(export_model(config, dtype, fuse_block)[0], tvm_target)
    return tune(mod, tvm_target, tuning_fingerprint(tvm_target, dtype), Path(out), trials=trials,
                max_seconds=max_seconds, progress=progress)


def compile_model(model_dir, out_dir, target: str = "llvm", dtype: str | None = None,
                  fuse_block: bool = True, tuning_db=None, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    model_dir, config, dtype, tvm_target = prepare(model_dir, target, dtype)
    checkpoint = Checkpoint(model_dir, config)  # checks every name and shape before any long work
    vocab, merges = tokenizer_files(model_dir)
    tuned = open_tuning_db(tuning_db, tvm_target, dtype) if tuning_db else None
    timings = {}
    artifact.check_replaceable(out_dir)
    with staging_dir(out_dir) as staging:
        start = time.perf_counter()
        with tqdm(total=1, desc="compile library", disable=not progress, leave=False) as bar:
            params, kernels = build_library(config, dtype, tvm_target, staging / artifact.LIBRARY, fuse_block,
                                            tuned)
            bar.update()
        timings["library_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with tqdm(total=len(params), desc="convert weights", disable=not progress, leave=False) as bar:
            files = write_shards(checkpoint.converted(dtype, fuse_block), staging, on_tensor=lambda _: bar.update())
        timings["weights_s"] = time.perf_counter() - start
        shutil.copyfile(vocab, staging / artifact.VOCAB)
        shutil.copyfile(merges, staging / artifact.MERGES)
        meta = artifact.write_metadata(
            staging, config=config.to_dict(), dtype=dtype, target=json.loads(str(tvm_target)),
            device="cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name,
            tvm_version=tvm.__version__, params=params, weight_files=list(files),
            functions=["prefill", "prefill_all", "decode"], extra={"fuse_block": fuse_block, "kernels": kernels, "compile_timings": timings,
                   "tuning_db": str(tuning_db) if tuned is not None else None})
    return meta
