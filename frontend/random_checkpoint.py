"""Write a GPT-J checkpoint in the Hugging Face layout with random weights (`gptj-tvm init-random`).

Every bias is non-zero and every LayerNorm far from (1, 0), and q/k are large enough that attention is not
uniform, so a wrong rotary layout or a dropped bias changes the logits. Tensors are drawn one at a time from
per-tensor seeds and written shard by shard, so the 6B shape is written in bounded memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gptj_tvm.core.errors import GptjError

from gptj_tvm.core.files import staging_dir

from .config import PRESETS, GPTJConfig
from .hf_tokenizer import packaged_tokenizer_dir
from .torch_zip import TorchZipWriter
from .weights import NUMPY_DTYPES, hf_tensors, write_shards

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


def mask_buffers(config: GPTJConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The buffers transformers before 4.31 saved in every layer: the causal mask and masked_bias."""
    mask = np.tril(np.ones((config.n_positions, config.n_positions), dtype=np.bool_))[None, None]
    for i in range(config.n_layer):
        yield f"transformer.h.{i}.attn.bias", mask
        yield f"transformer.h.{i}.attn.masked_bias", np.array(-1e9, dtype=NUMPY_DTYPES[config.torch_dtype])


def write_torch_shards(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path, shard_bytes: int,
                       on_tensor: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Like weights.write_shards, in torch.save's format, each tensor streamed into its file as it comes."""
    files: dict[str, list[str]] = {}
    writer, size = None, 0
    for name, tensor in tensors:
        if writer is None or (size and size + tensor.nbytes > shard_bytes):
            if writer is not None:
                writer.close()
            file = f"shard-{len(files):05d}.bin"
            writer, size, files[file] = TorchZipWriter(Path(out_dir) / file), 0, []
        writer.add(name, tensor)
        files[file].append(name)
        size += tensor.nbytes
        if on_tensor:
            on_tensor(name)
    if writer is not None:
        writer.close()
    return files


# format -> (single file, shard name pattern, index file)
WEIGHT_FILE_NAMES = {"safetensors": ("model.safetensors", "model-{:05d}-of-{:05d}.safetensors",
                                     "model.safetensors.index.json"),
                     "pytorch": ("pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin",
                                 "pytorch_model.bin.index.json")}


def write_random_checkpoint(out_dir: Path, config: GPTJConfig, seed: int = 0, shard_bytes: int = 2 << 30,
                            on_tensor: Callable[[str], None] | None = None,
                            weights_format: str = "safetensors") -> None:
    """Writes config.json, the weights (one file, or shards + index) and the tokenizer files into out_dir.
    weights_format "pytorch": pytorch_model.bin as torch.save writes it, with the mask buffers older saves hold."""
    out_dir = Path(out_dir)
    if weights_format not in WEIGHT_FILE_NAMES:
        raise GptjError(f"unknown weights format {weights_format!r}: choose one of {', '.join(WEIGHT_FILE_NAMES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GptjError(f"{out_dir}: exists and is not empty")
    np_dtype = NUMPY_DTYPES[config.torch_dtype]
    tensors = ((name, random_tensor(name, shape, seed).astype(np_dtype)) for name, shape in hf_tensors(config).items())
    single, pattern, index_name = WEIGHT_FILE_NAMES[weights_format]
    with staging_dir(out_dir) as tmp:
        if weights_format == "pytorch":
            shards = write_torch_shards(itertools.chain(tensors, mask_buffers(config)), tmp, shard_bytes, on_tensor)
        else:
            shards = write_shards(tensors, tmp, shard_bytes, pattern="shard-{:05d}.safetensors",
                                  metadata={"format": "pt"}, on_tensor=on_tensor)
        if len(shards) == 1:
            os.replace(tmp / next(iter(shards)), tmp / single)
        else:
            weight_map = {}
            for i, (name, names) in enumerate(shards.items()):
                final = pattern.format(i + 1, len(shards))
                os.replace(tmp / name, tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / index_name).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        tokenizer = packaged_tokenizer_dir()
        shutil.copyfile(tokenizer / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(tokenizer / "vocab.bpe", tmp / "merges.txt")
