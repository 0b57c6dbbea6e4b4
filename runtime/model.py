"""A compiled artifact, loaded: its library in TVM's VM, its weights on the device, its tokenizer, and the
compiled functions as Python calls (prefill and decode over a sequence's KV cache, the batched step over slot
caches). Generation is the engine's (runtime/engine.py); `Generator` (runtime/generator.py) adds its clients.

Imports TVM's runtime only (tvm.runtime), never its compiler, so it works with a runtime-only TVM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import tvm
import tvm.runtime
from safetensors import SafetensorError, safe_open
from tvm.runtime.vm import VirtualMachine

from gptj_tvm.core.errors import GptjError

from .artifact import MANIFEST_FUNCTION, ArtifactMetadata
from .generation import check_prompt
from .profiler import record_calls
from .tokenizer import ArtifactTokenizer

DEVICES = {"cpu": tvm.cpu, "cuda": tvm.cuda, "vulkan": lambda index=0: tvm.runtime.device("webgpu", index)}


class Model:
    def __init__(self, folder: Path, meta: ArtifactMetadata, vm: VirtualMachine, device, params,
                 tokenizer: ArtifactTokenizer):
        self.folder = folder
        self.meta = meta
        self.config = meta.config
        self.context = self.config.n_positions
        # eos and, for some fine-tunes, their end marker (Dolly's `### End`)
        self.stop_token_ids = frozenset(int(i) for i in meta.stop_token_ids)
        self.vocab_size = self.config.vocab_size
        self.device = device
        self.tokenizer = tokenizer
        self._vm = vm
        self._params = params

    @classmethod
    def load(cls, folder, device: str | None = None, adapter: str | None = None, verify: bool = False) -> "Model":
        """`adapter`: for Vulkan artifacts, the adapter's index or part of its name (default: the first);
        `verify`: check the weights' sha256 too (ArtifactMetadata.check_compatible)."""
        folder = Path(folder)
        meta = ArtifactMetadata.read(folder)
        meta.check_compatible(folder, tvm.__version__, verify)
        kind = device or meta.device
        if kind != meta.device or kind not in DEVICES:
            raise GptjError(f"{folder}: built for device {meta.device!r}, not {kind!r}")
        if adapter is not None and kind != "vulkan":
            raise GptjError(f"--device picks a Vulkan adapter; {folder} runs on {kind}")
        weights = weight_headers(folder, meta)
        dev = DEVICES[kind](open_vulkan(meta, adapter, weights) if kind == "vulkan" else 0)
        if not _device_exists(dev):
            raise GptjError(f"{folder}: needs a {kind} device, and none is visible")
        if kind == "cuda":
            check_cuda_arch(folder, meta, dev)
        try:
            lib = tvm.runtime.load_module(str(folder / meta.library))
        except Exception as err:  # noqa: BLE001  (TVM raises many kinds; the user needs one line)
            raise GptjError(f"{folder / meta.library}: cannot load the compiled library ({err})") from None
        # CPU: the naive allocator hands intermediates back to the system; the pooled one keeps a buffer for
        # every size it saw (each prompt length), which a 24 GB machine running a 12 GB model cannot spare
        vm = VirtualMachine(lib, dev, memory_cfg="naive" if kind == "cpu" else "pooled")
        manifest = library_manifest(folder, meta, vm)
        meta.check_library(folder, manifest)
        meta.check_weights(folder, manifest, {w.key: (w.shape, w.dtype) for w in weights})
        params = load_params(folder, meta, dev, weights)
        tokenizer = ArtifactTokenizer(folder / meta.tokenizer)
        return cls(folder, meta, vm, dev, params, tokenizer)

    # -- the model -------------------------------------------------------------------------------------
    def forward(self, function: str, ids: Sequence[int], cache, total: int) -> tuple[np.ndarray, object]:
        """Run "prefill", "prefill_all" or "decode" on ids appended to cache (which then holds total tokens);
        returns float32 logits [positions, vocab_size] and the updated cache. An artifact with prefill
        buckets (static-length prefill functions: float CPU artifacts, and tuned ones) prefills in chunks of
        those lengths."""
        if not len(ids) <= total <= int(cache[0].shape[0]):
            raise GptjError(f"{total} tokens do not fit a KV cache of {int(cache[0].shape[0])} positions")
        if function == "prefill" and self.meta.prefill_buckets:
            logits, start = None, total - len(ids)
            for name, piece in self._prefill_pieces(len(ids)):
                logits, cache = self._call(name, ids[:piece], cache, start + piece)
                ids, start = ids[piece:], start + piece
            return logits, cache
        return self._call(function, ids, cache, total)

    def _prefill_pieces(self, n: int) -> list[tuple[str, int]]:
        """A prompt of n tokens as (function, length) pieces: the artifact's prefill buckets, largest
        first while one fits, then the dynamic prefill for what is left. The logits come from the last."""
        buckets = sorted(((int(b), f) for b, f in self.meta.prefill_buckets.items()), reverse=True)
        pieces = []
        for bucket, function in buckets:
            while n >= bucket:
                pieces.append((function, bucket))
                n -= bucket
        return pieces + ([("prefill", n)] if n else [])

    @property
    def weights(self) -> dict:
        """The loaded weights by name (TVM tensors on the device), in the order the compiled functions take them."""
        return dict(zip(self.meta.params, self._params))

    def profile(self, function: str, ids: Sequence[int], cache, total: int, measure=None) -> list[tuple]:
        """Runs `function` once on ids with TVM's kernel profiler hook: [(kernel or builtin, seconds,
        measure(name, call arguments) or None), ...] in call order (runtime/profiler.py)."""
        _, calls = record_calls(self._vm, function, *self._arguments(ids, cache, total), measure=measure)
        return calls

    def _arguments(self, ids: Sequence[int], cache, total: int) -> tuple:
        """What the compiled functions take: token ids [1, n], the KV cache, its length after them, the weights."""
        tokens = tvm.runtime.tensor(np.asarray(ids, dtype=np.int32).reshape(1, -1), self.device)
        return tokens, cache, tvm.runtime.ShapeTuple([total]), self._params

    def _call(self, function: str, ids: Sequence[int], cache, total: int) -> tuple[np.ndarray, object]:
        try:
            logits = self._vm[function](*self._arguments(ids, cache, total))
        except RuntimeError as err:
            if self.meta.device != "vulkan":
                raise
            # runtime/vulkan.py's errors come back through TVM's runtime as RuntimeError, already one line
            raise GptjError(str(err).strip().splitlines()[-1] if str(err).strip() else "Vulkan failed") from None
        return logits.numpy().reshape(-1, logits.shape[-1])[:, : self.vocab_size], cache

    def run_step(self, tokens, slots, positions, logit_rows, caches):
        """The batched `step`: rows of several sequences over slot caches (runtime/executors.py)."""
        return self._vm["step"](tokens, slots, positions, logit_rows, caches, self._params)

    def new_cache(self, capacity: int | None = None):
        """Key and value caches for every layer, [capacity, n_head, head_dim] (capacity: the positions the
        sequence will fill, n_positions by default; GPT-J-6B's full cache is 0.9 GB in bfloat16); the compiled
        functions write them in place. Positions past the current length are never read, so a cache needs no
        clearing; each sequence gets its own, so a `logits()` call in the middle of a stream leaves the
        stream's alone."""
        capacity = min(capacity or self.context, self.context)
        return self._caches((capacity, self.config.n_head, self.config.head_dim))

    def new_slot_caches(self, slots: int, positions: int):
        """The batched step's caches: [slots, positions, n_head, head_dim] for every layer's keys and values."""
        return self._caches((slots, positions, self.config.n_head, self.config.head_dim))

    def _caches(self, shape: tuple[int, ...]):
        return tvm.runtime.convert([tvm.runtime.empty(shape, self.meta.dtype, self.device)
                                    for _ in range(2 * self.config.n_layer)])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits [len(ids), vocab_size] at every position of ids."""
        ids = check_prompt(ids, self.vocab_size, self.context, self.context)
        return self.forward("prefill_all", ids, self.new_cache(len(ids)), len(ids))[0]


def runnable_here(meta: ArtifactMetadata) -> bool:
    """Whether this machine has the artifact's device (and the artifact its weights)."""
    if meta.device not in DEVICES or meta.weights_pending:
        return False
    if meta.device == "vulkan":
        from . import vulkan

        try:
            return bool(vulkan.adapters())
        except GptjError:  # no wgpu
            return False
    return _device_exists(DEVICES[meta.device](0))


def _device_exists(device) -> bool:
    try:
        return bool(device.exist)
    except Exception:  # noqa: BLE001  (TVM's CUDA runtime fails to load without a driver: no device)
        return False


def open_vulkan(meta: ArtifactMetadata, adapter: str | None, weights: list[Weight]) -> int:
    """Make this process able to run a Vulkan artifact (its weights, from weight_headers), on the adapter asked
    for; returns its index."""
    from . import vulkan  # wgpu is imported only for Vulkan artifacts

    index = vulkan.pick_adapter(adapter)
    found = vulkan.describe(vulkan.adapters()[index])
    missing = [f for f in meta.device_features if f not in found["features"]]
    if missing:
        raise GptjError(f"Vulkan adapter {found['name']} lacks {', '.join(missing)}, which this "
                        f"{meta.dtype} artifact needs; compile it with --dtype float32")
    largest, _, name, *_ = max(weights, default=(0, "", ""))
    if largest > vulkan.max_buffer_bytes(index):
        raise GptjError(f"Vulkan adapter {found['name']} binds at most {vulkan.max_buffer_bytes(index) >> 20} MiB "
                        f"per buffer, and weight {name} is {largest >> 20} MiB")
    vulkan.select(index)
    return index


def check_cuda_arch(folder: Path, meta: ArtifactMetadata, device) -> None:
    """Machine code for sm_XY runs on GPUs of compute capability X.Y and up (within a generation the
    fatbin's PTX is JIT-compiled for newer ones); an older GPU cannot run it."""
    built = str(meta.target.get("arch", "sm_0"))
    need = int("".join(ch for ch in built[len("sm_"):] if ch.isdigit()) or 0)
    have = int(str(device.compute_version).replace(".", ""))
    if have < need:
        raise GptjError(f"{folder}: built for {built}, but this GPU ({device.device_name}) is "
                        f"sm_{have}; compile it with --arch sm_{have}")


_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1)}


class Weight(NamedTuple):
    bytes: int
    file: str
    key: str
    shape: list[int]
    dtype: str  # numpy's name


def weight_headers(folder: Path, meta: ArtifactMetadata) -> list[Weight]:
    """Every weight of the artifact, from the files' headers."""
    weights = []
    for name in meta.weight_files:
        try:
            with safe_open(str(folder / name), framework="np") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    dtype, item_bytes = _DTYPES.get(info.get_dtype(), (info.get_dtype(), 4))
                    shape = [int(n) for n in info.get_shape()]
                    weights.append(Weight(int(np.prod(shape)) * item_bytes, name, key, shape, dtype))
        except (SafetensorError, OSError, ValueError) as err:
            raise GptjError(f"{folder / name}: corrupt weight file ({err})") from None
    return weights


def library_manifest(folder: Path, meta: ArtifactMetadata, vm: VirtualMachine) -> dict:
    """What the library says it was compiled for (runtime/artifact.py library_manifest)."""
    try:
        return json.loads(str(vm[MANIFEST_FUNCTION]()))
    except Exception as err:  # noqa: BLE001  (TVM's error for a missing function, or bad JSON: one line)
        raise GptjError(f"{folder / meta.library}: carries no readable manifest of what it was compiled for "
                        f"({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
                        "compile it again") from None


def load_params(folder: Path, meta: ArtifactMetadata, device, weights: list[Weight]) -> "tvm.runtime.Object":
    """The weights (from weight_headers) as one packed tuple, in the order the compiled functions take them."""
    tensors = {}
    # One tensor at a time (its file pages leave the process with it), the largest first: loading one holds it
    # twice for a moment, which then happens while little else is loaded (GPT-J-6B: 0.4 GB embedding, lm_head).
    for _, name, key, *_ in sorted(weights, key=lambda weight: -weight.bytes):
        try:
            with safe_open(str(folder / name), framework="np") as f:
                tensors[key] = tvm.runtime.tensor(f.get_tensor(key), device)
        except (SafetensorError, OSError, ValueError) as err:
            raise GptjError(f"{folder / name}: corrupt weight file ({err})") from None
    missing = [p for p in meta.params if p not in tensors]
    if missing:
        raise GptjError(f"{folder}: weight {missing[0]} missing from the artifact")
    return tvm.runtime.convert([tensors[p] for p in meta.params])
