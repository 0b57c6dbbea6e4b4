"""Weights into an artifact, with numpy and safetensors only: never TVM's compiler.

`compile` builds the library from the config alone and converts the weights here; `compile --no-weights`
stops after the library, and `convert-weights` adds the weights later, on whatever machine has the checkpoint
(a GPU machine with TVM's runtime only, for example). Either way the artifact appears whole: the new folder is
staged beside the old one and renamed into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from gptj_tvm.core.errors import GptjError
from gptj_tvm.core.files import staging_dir
from gptj_tvm.frontend.config import GPTJConfig
from gptj_tvm.frontend.weights import Checkpoint, write_shards
from gptj_tvm.runtime.artifact import ArtifactMetadata


def write_weights(checkpoint: Checkpoint, meta: ArtifactMetadata, folder: Path,
                  progress: bool = True) -> tuple[list[str], float]:
    """The checkpoint converted for the artifact meta describes (dtype, fused blocks, linear layouts), written
    as shards into folder; returns the file names and the seconds it took."""
    start = time.perf_counter()
    tensors = checkpoint.converted(meta.dtype, meta.plan, meta.fuse_block)
    with tqdm(total=len(meta.params), desc="convert weights", disable=not progress, leave=False) as bar:
        files = write_shards(tensors, folder, on_tensor=lambda _: bar.update())
    return list(files), time.perf_counter() - start


def convert_weights(model_dir, artifact_dir, progress: bool = True) -> ArtifactMetadata:
    """`gptj-tvm convert-weights`: the checkpoint's weights into an artifact compiled with --no-weights (or
    replacing an artifact's weights with another checkpoint of the same config)."""
    model_dir, artifact_dir = Path(model_dir), Path(artifact_dir)
    meta = ArtifactMetadata.read(artifact_dir)
    if not model_dir.is_dir():
        raise GptjError(f"{model_dir}: no such checkpoint folder")
    config = GPTJConfig.from_file(model_dir / "config.json")
    if config != meta.config:
        built = meta.config.to_dict()
        differs = sorted(k for k, v in config.to_dict().items() if built.get(k) != v)
        raise GptjError(f"{model_dir}: its config differs from the artifact's ({', '.join(differs)}); "
                        "compile this checkpoint instead")
    checkpoint = Checkpoint(model_dir, config)
    with staging_dir(artifact_dir) as staging:
        for name in (meta.library, meta.tokenizer):
            shutil.copy2(artifact_dir / name, staging / name)
        files, seconds = write_weights(checkpoint, meta, staging, progress)
        meta = dataclasses.replace(meta, compile_timings={**meta.compile_timings, "weights_s": seconds})
        return meta.save(staging, files)
