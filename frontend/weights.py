"""Hugging Face GPT-J checkpoints -> this project's weight layout. Needs numpy and safetensors only (no torch).

The name map is written out in `hf_name_map`: each of our tensors names its Hugging Face source and whether it
is transposed (HF stores linear weights [out, in]; our kernels read [in, out]). Conversion reads one source
tensor at a time from memory-mapped shards and writes our weights in output shards of bounded size, so the 6B
model is never held twice in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gptj_tvm.core.errors import GptjError

from .checkpoint_files import CheckpointFiles
from .config import GPTJConfig, rotary_tables
from .layouts import LayoutPlan
from .layouts.base import as_bits

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FLOAT_DTYPES = (*NUMPY_DTYPES.values(), np.dtype(np.float64))
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
SHARD_BYTES = 1 << 30  # what conversion holds in memory before writing it out


@dataclass(frozen=True)
class Part:
    hf_name: str | None  # None: zeros of hf_shape
    hf_shape: tuple[int, ...]
    transpose: bool = False  # HF linear weights are [out, in]; ours are [in, out]


@dataclass(frozen=True)
class Source:
    """One of our tensors: its HF parts (transposed as marked), concatenated along axis, then zero-padded."""
    parts: tuple[Part, ...]
    axis: int = 0
    pad_last_to: int | None = None

    @property
    def linear(self) -> bool:
        return any(part.transpose for part in self.parts)

    def in_out(self) -> tuple[int, int]:
        """A linear weight's (in_features, out_features) as the model sees it, padding included."""
        outs, ins = [p.hf_shape[0] for p in self.parts], [p.hf_shape[1] for p in self.parts]
        in_features, out_features = (ins[0], sum(outs)) if self.axis == 1 else (sum(ins), outs[0])
        return in_features, max(out_features, self.pad_last_to or 0)


def _one(hf_name: str, shape: tuple[int, ...], transpose: bool = False, pad_last_to: int | None = None) -> Source:
    return Source((Part(hf_name, shape, transpose),), pad_last_to=pad_last_to)


def hf_name_map(config: GPTJConfig, fuse_block: bool = True) -> dict[str, Source]:
    """Our tensor name -> its Hugging Face sources, in the order the model declares its parameters.

    fuse_block merges each block's projections: w_in = [q | k | v | fc_in] ([d, 3d + d_ff], bias zero for q, k,
    v) and w_out = [out_proj ; fc_out] ([d + d_ff, d]), so the block reads its input once per GEMM."""
    d, ff, vocab = config.n_embd, config.d_ff, config.vocab_size
    names: dict[str, Source] = {"wte": _one("transformer.wte.weight", (vocab, d))}
    for i in range(config.n_layer):
        hf, ours = f"transformer.h.{i}", f"h.{i}"
        names[f"{ours}.ln_1.weight"] = _one(f"{hf}.ln_1.weight", (d,))
        names[f"{ours}.ln_1.bias"] = _one(f"{hf}.ln_1.bias", (d,))
        proj = {p: Part(f"{hf}.attn.{p}.weight", (d, d), transpose=True)
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        fc_in = Part(f"{hf}.mlp.fc_in.weight", (ff, d), transpose=True)
        fc_in_bias = Part(f"{hf}.mlp.fc_in.bias", (ff,))
        fc_out = Part(f"{hf}.mlp.fc_out.weight", (d, ff), transpose=True)
        fc_out_bias = _one(f"{hf}.mlp.fc_out.bias", (d,))
        if fuse_block:
            names[f"{ours}.w_in.weight"] = Source((proj["q_proj"], proj["k_proj"], proj["v_proj"], fc_in), axis=1)
            names[f"{ours}.w_in.bias"] = Source((Part(None, (3 * d,)), fc_in_bias))
            names[f"{ours}.w_out.weight"] = Source((proj["out_proj"], fc_out), axis=0)
            names[f"{ours}.w_out.bias"] = fc_out_bias
        else:
            for p, part in proj.items():
                names[f"{ours}.attn.{p}.weight"] = Source((part,))
            names[f"{ours}.mlp.fc_in.weight"] = Source((fc_in,))
            names[f"{ours}.mlp.fc_in.bias"] = Source((fc_in_bias,))
            names[f"{ours}.mlp.fc_out.weight"] = Source((fc_out,))
            names[f"{ours}.mlp.fc_out.bias"] = fc_out_bias
    names["ln_f.weight"] = _one("transformer.ln_f.weight", (d,))
    names["ln_f.bias"] = _one("transformer.ln_f.bias", (d,))
    padded = config.padded_vocab_size
    names["lm_head.weight"] = _one("lm_head.weight", (vocab, d), transpose=True, pad_last_to=padded)
    names["lm_head.bias"] = _one("lm_head.bias", (vocab,), pad_last_to=padded)
    return names


def hf_tensors(config: GPTJConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-J checkpoint for config holds (HF name -> shape), in the plain layout's order."""
    return {part.hf_name: part.hf_shape for src in hf_name_map(config, fuse_block=False).values()
            for part in src.parts}


def _transposed(tensor: np.ndarray) -> np.ndarray:
    # numpy copies native 2-byte types much faster than ml_dtypes' bfloat16: move the bits as uint16
    return np.ascontiguousarray(as_bits(tensor).T).view(tensor.dtype)


class Checkpoint:
    """The tensors of a HF checkpoint (safetensors or PyTorch .bin), checked against the config, read one at a
    time. The causal-mask buffers older saves store (`attn.bias`, `attn.masked_bias`) are ignored."""

    def __init__(self, model_dir: Path, config: GPTJConfig):
        self.config = config
        self.files = CheckpointFiles(model_dir)
        shapes = {name: info.shape for name, info in self.files.tensors.items()}
        self.ignored = sorted(name for name in shapes if name.endswith(IGNORED_SUFFIXES))
        expected = hf_tensors(config)
        if "lm_head.weight" not in shapes:
            saved_from = " (saved from GPTJModel, the bare transformer)" if "wte.weight" in shapes else ""
            raise GptjError(f"{model_dir}: the checkpoint has no LM head (lm_head.weight){saved_from}; "
                            "a GPTJForCausalLM checkpoint is needed to generate text")
        for name, shape in expected.items():
            if name not in shapes:
                raise GptjError(f"{model_dir}: tensor {name} is missing (config has n_layer={config.n_layer})")
            if shapes[name] != shape:
                raise GptjError(f"{model_dir}: tensor {name} has shape {list(shapes[name])}, "
                                f"the config needs {list(shape)}")
        for name in shapes:
            if name not in expected and not name.endswith(IGNORED_SUFFIXES):
                raise GptjError(f"{model_dir}: unexpected tensor {name} (does the checkpoint match config.json?)")
        for name in expected:
            if self.files.tensors[name].dtype not in FLOAT_DTYPES:
                raise GptjError(f"{model_dir}: tensor {name} is {self.files.tensors[name].dtype}, not a float type")

    def summary(self) -> dict:
        return {"format": self.files.format, "files": len(self.files.files), "dtype": self.files.dtype,
                "ignored_buffers": len(self.ignored)}

    def dtype_of(self, hf_name: str) -> np.dtype:
        return self.files.tensors[hf_name].dtype

    def read(self, hf_name: str) -> np.ndarray:
        return self.files.read(hf_name)

    def converted(self, dtype: str, plan: LayoutPlan, fuse_block: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Our tensors in `dtype`, one at a time, the rotary tables (float32) first, each linear weight in the
        layout `plan` gives it (frontend/layouts/: from [in, out], or from HF's own [out, in] rows)."""
        cos, sin = rotary_tables(self.config)
        yield "rotary.cos", cos
        yield "rotary.sin", sin
        for ours, src in hf_name_map(self.config, fuse_block).items():
            # vectors (LayerNorm, biases) stay float32 whatever the dtype: the model reads them in float32
            target = NUMPY_DTYPES[dtype] if len(src.parts[0].hf_shape) == 2 else np.dtype(np.float32)
            layout = plan.layout_for(ours.rsplit(".", 1)[0], *src.in_out()) if src.linear else None
            rows = layout is not None and layout.hf_rows  # the HF layout already: nothing to transpose
            if layout is not None and layout.quantized:  # from the checkpoint's own values, not rounded ones
                target = self.dtype_of(src.parts[0].hf_name)
            pieces = []
            for part in src.parts:
                if part.hf_name is None:
                    pieces.append(np.zeros(part.hf_shape, dtype=target))
                    continue
                tensor = self.read(part.hf_name).astype(target, copy=False)
                pieces.append(_transposed(tensor) if part.transpose and not rows else tensor)
            axis = 1 - src.axis if rows else src.axis  # the map's axes are those of [in, out]
            tensor = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)
            out_axis = 0 if rows else tensor.ndim - 1
            if src.pad_last_to is not None and src.pad_last_to > tensor.shape[out_axis]:
                padding = [(0, 0)] * tensor.ndim
                padding[out_axis] = (0, src.pad_last_to - tensor.shape[out_axis])
                tensor = np.pad(tensor, padding)
            if layout is None:
                yield ours, np.ascontiguousarray(tensor)
                continue
            for name, array in layout.convert(tensor).items():
                yield ours.replace(".weight", f".{name}"), array


def write_shards(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path, shard_bytes: int = SHARD_BYTES,
                 pattern: str = "params-{:05d}.safetensors", metadata: dict | None = None,
                 on_tensor: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Write tensors into files named by pattern (0, 1, ...), each at most about shard_bytes; holds one shard in
    memory at a time. Returns {file name: names of the tensors in it}, in order."""
    files: dict[str, list[str]] = {}
    pending: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        nonlocal pending, size
        if pending:
            name = pattern.format(len(files))
            save_file(pending, str(Path(out_dir) / name), metadata=metadata)
            files[name] = list(pending)
        pending, size = {}, 0

    for name, tensor in tensors:
        if size and size + tensor.nbytes > shard_bytes:
            flush()
        pending[name] = tensor
        size += tensor.nbytes
        if on_tensor:
            on_tensor(name)
    flush()
    return files
