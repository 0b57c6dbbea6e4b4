"""Write a GPT-J checkpoint in the Hugging Face layout with random weights (`gptj-tvm init-random`).

Every bias is non-zero and every LayerNorm far from (1, 0), and q/k are large enough that attention is not
uniform, so a wrong rotary layout or a dropped bias changes the logits. Tensors are drawn one at a time from
per-tensor seeds and written shard by shard, so the 6B shape is written in bounded memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from gptj_tvm.errors import GptjError

from .config import PRESETS, GPTJConfig
from .weights import NUMPY_DTYPES, hf_name_map

def packaged_tokenizer_dir() -> Path:
    """The GPT-2 tokenizer files shipped with the package (encoder.json, vocab.bpe)."""
    import gptj_tvm  # noqa: PLC0415  (the package root knows where its data lives, installed or not)

    return Path(gptj_tvm.__file__).resolve().parent / "data" / "gpt2"


def make_config(preset: str, layers: int | None, dtype: str | None) -> GPTJConfig:
    if preset not in PRESETS:
        raise GptjError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    changes = {}
    if layers is not None:
        changes["n_layer"] = layers
    if dtype is not None:
        changes["torch_dtype"] = dtype
    return dataclasses.replace(config, **changes).validate()


def random_tensor(hf_name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, *hf_name.encode()])
    kind = hf_name.rsplit(".", 2)
    if "ln_" in hf_name:
        if hf_name.endswith(".weight"):  # far from 1: uniform on [0.5, 1.5] with sign flips on a few
            return rng.uniform(0.5, 1.5, size=shape).astype(np.float32) * rng.choice([1.0, -1.0], shape, p=[0.9, 0.1])
        return rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    if hf_name.endswith(".bias"):
        return rng.normal(0.0, 0.2, size=shape).astype(np.float32)
    if hf_name.endswith("wte.weight"):
        return rng.standard_normal(size=shape, dtype=np.float32)
    fan_in = shape[1]
    # q and k get twice the usual scale so scores are far from uniform; lm_head spreads the logits.
    gain = 2.0 if kind[-2] in ("q_proj", "k_proj") else (3.0 if hf_name.startswith("lm_head") else 1.0)
    return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(gain / np.sqrt(fan_in))


def write_random_checkpoint(out_dir: Path, config: GPTJConfig, seed: int = 0, shard_bytes: int = 2 << 30,
                            on_tensor: Callable[[str, int], None] | None = None) -> None:
    """Writes config.json, model.safetensors (or shards + index) and the tokenizer files into out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GptjError(f"{out_dir}: exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        np_dtype = NUMPY_DTYPES[config.torch_dtype]
        weight_map: dict[str, str] = {}
        pending: dict[str, np.ndarray] = {}
        size = 0
        total = 0
        shard_files: list[str] = []

        def flush():
            nonlocal pending, size
            if pending:
                name = f"model-{len(shard_files) + 1:05d}.safetensors"
                save_file(pending, str(tmp / name), metadata={"format": "pt"})
                shard_files.append(name)
                for key in pending:
                    weight_map[key] = name
            pending, size = {}, 0

        for src in hf_name_map(config).values():
            tensor = random_tensor(src.hf_name, src.hf_shape, seed).astype(np_dtype)
            if size and size + tensor.nbytes > shard_bytes:
                flush()
            pending[src.hf_name] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
            if on_tensor:
                on_tensor(src.hf_name, tensor.nbytes)
        flush()
        if len(shard_files) == 1:
            os.replace(tmp / shard_files[0], tmp / "model.safetensors")
        else:
            final = {}
            for i, name in enumerate(shard_files):
                new = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
                os.replace(tmp / name, tmp / new)
                final[name] = new
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        tokenizer = packaged_tokenizer_dir()
        shutil.copyfile(tokenizer / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(tokenizer / "vocab.bpe", tmp / "merges.txt")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
