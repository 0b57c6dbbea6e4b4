"""The weight files of a Hugging Face checkpoint folder, whichever format they are in, read one tensor at a time.

Looked for in transformers' order: `model.safetensors.index.json` (shards), `model.safetensors`,
`pytorch_model.bin.index.json` (shards), `pytorch_model.bin` (torch.save's zip format, read without torch by
frontend/torch_zip.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from gptj_tvm.core.errors import GptjError

from .torch_zip import TorchZipFile

SAFETENSORS, PYTORCH = "safetensors", "pytorch"
# (index file, single file, format), in the order transformers prefers them
LAYOUTS = (("model.safetensors.index.json", "model.safetensors", SAFETENSORS),
           ("pytorch_model.bin.index.json", "pytorch_model.bin", PYTORCH))
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    path: Path


def _shards(model_dir: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise GptjError(f"{index}: not a valid checkpoint index ({err})") from None
    for path in files:
        if not path.is_file():
            raise GptjError(f"{path}: shard listed in {index.name} is missing")
    return files


def find_weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """(format, files) of the checkpoint in model_dir."""
    model_dir = Path(model_dir)
    for index, single, kind in LAYOUTS:
        if (model_dir / index).is_file():
            return kind, _shards(model_dir, model_dir / index)
        if (model_dir / single).is_file():
            return kind, [model_dir / single]
    raise GptjError(f"{model_dir}: no weights (model.safetensors, pytorch_model.bin, or their sharded index)")


class CheckpointFiles:
    """Every tensor of a checkpoint's weight files: name -> shape, dtype, file; `read` gives one as numpy."""

    def __init__(self, model_dir: Path):
        self.format, self.files = find_weight_files(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self._torch: dict[Path, TorchZipFile] = {}
        for path in self.files:
            if self.format == PYTORCH:
                self._torch[path] = reader = TorchZipFile(path)
                for name, ref in reader.tensors.items():
                    self.tensors[name] = TensorInfo(ref.shape, ref.dtype, path)
                continue
            try:
                with safe_open(str(path), framework="np") as f:
                    for name in f.keys():
                        info = f.get_slice(name)
                        dtype = np.dtype(_SAFETENSORS_DTYPES.get(info.get_dtype(), np.float32))
                        self.tensors[name] = TensorInfo(tuple(info.get_shape()), dtype, path)
            except (SafetensorError, OSError, ValueError) as err:
                raise GptjError(f"{path}: not a readable safetensors file ({err})") from None

    @property
    def dtype(self) -> str:
        """The dtype of the weights, as the embedding has it: float64 counts as float32, which is also what a
        checkpoint without an embedding is taken for (the config check names what is missing)."""
        info = self.tensors.get("transformer.wte.weight")
        return str(info.dtype) if info is not None and info.dtype != np.float64 else "float32"

    def read(self, name: str) -> np.ndarray:
        path = self.tensors[name].path
        if self.format == PYTORCH:
            return self._torch[path].read(name)
        try:
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise GptjError(f"{path}: cannot read tensor {name} ({err})") from None
