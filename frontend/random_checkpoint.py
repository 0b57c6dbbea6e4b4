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
from pathlib import Path
from typing import Callable

import numpy as np

from gptj_tvm.errors import GptjError

from gptj_tvm.files import staging_dir

from .config import PRESETS, GPTJConfig
from .weights import NUMPY_DTYPES, hf_tensors, write_shards

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
                            on_tensor: Callable[[str], None] | None = None) -> None:
    """Writes config.json, model.safetensors (or shards + index) and the tokenizer files into out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GptjError(f"{out_dir}: exists and is not empty")
    np_dtype = NUMPY_DTYPES[config.torch_dtype]
    tensors = ((name, random_tensor(name, shape, seed).astype(np_dtype)) for name, shape in hf_tensors(config).items())
    with staging_dir(out_dir) as tmp:
        shards = write_shards(tensors, tmp, shard_bytes, pattern="shard-{:05d}.safetensors",
                              metadata={"format": "pt"}, on_tensor=on_tensor)
        if len(shards) == 1:
            os.replace(tmp / next(iter(shards)), tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (name, names) in enumerate(shards.items()):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        tokenizer = packaged_tokenizer_dir()
        shutil.copyfile(tokenizer / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(tokenizer / "vocab.bpe", tmp / "merges.txt")
