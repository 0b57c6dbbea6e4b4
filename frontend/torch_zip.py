"""PyTorch checkpoints (`torch.save`'s zip format, `pytorch_model*.bin`) read and written without torch.

A `.bin` is a zip archive: `<root>/data.pkl`, a pickle of the state dict whose tensors refer to storages by key,
and one uncompressed entry `<root>/data/<key>` per storage. A pickle may call any Python function, so the
unpickler here resolves only the names torch.save writes for a state dict (the tensor rebuild functions,
the typed storage classes, OrderedDict) to inert stand-ins of its own: nothing a file asks for is imported or
called, and any other name stops the read with one line naming the file. Tensors are read one at a time, each
straight from its storage's bytes in the file (a 24 GB float32 file is never held whole).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from gptj_tvm.core.errors import GptjError

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
# torch.save's legacy (before torch 1.6) format starts with a pickled magic number instead of a zip header
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


@dataclass(frozen=True)
class StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the file: where its elements are, not the elements."""
    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    return data


# The only names a state dict's pickle may mention, each mapped to an inert stand-in.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise GptjError(f"{self.path}: refusing to load: its pickle asks for {module}.{name}, which is not "
                            "part of a PyTorch state dict (nothing from it was run)")
        return allowed

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], StorageType)):
            raise GptjError(f"{self.path}: refusing to load: an unknown storage reference {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        return StorageRef(str(key), storage_type.dtype, int(numel))


class TorchZipFile:
    """The tensors of one torch.save zip file: names, shapes and dtypes at once, elements on `read`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            if not zipfile.is_zipfile(self.path):
                with open(self.path, "rb") as f:
                    head = f.read(len(LEGACY_MAGIC))
                if head == LEGACY_MAGIC:
                    raise GptjError(f"{self.path}: saved in torch's legacy format (before torch 1.6), which is not "
                                    "read; re-save it with torch.save() from a recent torch, or as safetensors")
                raise GptjError(f"{self.path}: not a PyTorch checkpoint (torch.save's zip format)")
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise GptjError(f"{self.path}: a zip file, but not torch.save's (no single data.pkl)")
            self._root = pickles[0][: -len("data.pkl")]
            byteorder = self._root + "byteorder"
            if byteorder in names and self._zip.read(byteorder).strip() not in (b"little", b""):
                raise GptjError(f"{self.path}: saved on a big-endian machine, which is not read")
            state = _StateDictUnpickler(self._zip.read(pickles[0]), self.path).load()
        except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                AttributeError, IndexError, KeyError, struct.error) as err:
            raise GptjError(f"{self.path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # Lightning-style wrapper
        if not isinstance(state, dict) or not all(isinstance(v, TensorRef) for v in state.values()):
            raise GptjError(f"{self.path}: does not hold a state dict of tensors")
        self.tensors: dict[str, TensorRef] = {str(k): v for k, v in state.items()}

    def _seek_to_data(self, f, info: zipfile.ZipInfo) -> None:
        """Moves the open file f to the first byte of the stored entry info (past its local header)."""
        f.seek(info.header_offset)
        header = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
        if header[0] != b"PK\x03\x04":
            raise GptjError(f"{self.path}: corrupt zip entry {info.filename}")
        name_length, extra_length = header[-2], header[-1]
        f.seek(name_length + extra_length, 1)

    def read(self, name: str) -> np.ndarray:
        """The tensor `name`, as a numpy array of its own dtype (a copy of the file's bytes)."""
        ref = self.tensors[name]
        dtype, itemsize = ref.dtype, ref.dtype.itemsize
        if any(s < 0 for s in ref.stride) or len(ref.stride) != len(ref.shape):
            raise GptjError(f"{self.path}: tensor {name} has an unreadable layout (stride {ref.stride})")
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else 0
        if ref.offset + span > ref.storage.numel:
            raise GptjError(f"{self.path}: tensor {name} reaches past its storage")
        entry = f"{self._root}data/{ref.storage.key}"
        try:
            info = self._zip.getinfo(entry)
            if info.file_size != ref.storage.numel * itemsize:
                raise GptjError(f"{self.path}: storage {entry} holds {info.file_size} bytes, its tensors need "
                                f"{ref.storage.numel * itemsize} (truncated or corrupt)")
            flat = np.empty(span, dtype=np.uint8 if dtype == np.bool_ else dtype)
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:
                    self._seek_to_data(f, info)
                    f.seek(ref.offset * itemsize, 1)
                    got = f.readinto(memoryview(flat.view(np.uint8)))
                if got != flat.nbytes:
                    raise GptjError(f"{self.path}: storage {entry} is truncated")
            else:  # not what torch.save writes, but a re-zipped file is still readable
                with self._zip.open(info) as f:
                    raw = f.read()
                flat[...] = np.frombuffer(raw, dtype=flat.dtype, count=span, offset=ref.offset * itemsize)
        except KeyError:
            raise GptjError(f"{self.path}: storage {entry} of tensor {name} is missing") from None
        except (OSError, zipfile.BadZipFile) as err:
            raise GptjError(f"{self.path}: cannot read tensor {name} ({err})") from None
        flat = flat.view(dtype)
        strides = tuple(s * itemsize for s in ref.stride)
        if not ref.shape:  # a scalar
            return flat.reshape(())
        tensor = np.lib.stride_tricks.as_strided(flat, shape=ref.shape, strides=strides, writeable=False)
        return np.ascontiguousarray(tensor)


class _Global:
    """A reference to module.name, pickled as such (what torch's own classes and functions pickle as), with
    no import of the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's reduce wants a callable; this one is only ever written
        raise TypeError(f"{self.module}.{self.name} is a reference, not a function")


class _StateDictPickler(pickle._Pickler):  # the Python pickler: its dispatch table takes _Global
    """Pickles {name: TensorRef} as torch.save does: _rebuild_tensor_v2 over storages by persistent id."""

    def _save_global_ref(self, ref: _Global):
        self.write(pickle.GLOBAL + f"{ref.module}\n{ref.name}\n".encode())
        self.memoize(ref)

    dispatch = {**pickle._Pickler.dispatch, _Global: _save_global_ref}

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return "storage", _Global("torch", STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel
        return None

    def reducer_override(self, obj):
        if isinstance(obj, TensorRef):
            return (_Global("torch._utils", "_rebuild_tensor_v2"),
                    (obj.storage, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict()))
        return NotImplemented


class TorchZipWriter:
    """Writes tensors as torch.save(state_dict) does (zip format, one storage per tensor), streaming each
    tensor's bytes into the archive as it is added: memory holds one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._root = self.path.stem.replace(".", "_") + "/"
        self._refs: dict[str, TensorRef] = {}
        self._archive = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, tensor: np.ndarray) -> None:
        tensor = np.require(tensor, requirements="C")  # keeps a scalar 0-d
        if tensor.dtype not in STORAGE_NAMES:
            raise GptjError(f"{name}: dtype {tensor.dtype} has no torch storage type")
        storage = StorageRef(str(len(self._refs)), tensor.dtype, tensor.size)
        stride = tuple(s // tensor.itemsize for s in tensor.strides)
        self._refs[name] = TensorRef(storage, 0, tuple(tensor.shape), stride)
        with self._archive.open(f"{self._root}data/{storage.key}", "w", force_zip64=tensor.nbytes >= 1 << 31) as out:
            out.write(memoryview(tensor.reshape(-1).view(np.uint8)))

    def close(self) -> None:
        buffer = io.BytesIO()
        _StateDictPickler(buffer, protocol=2).dump(collections.OrderedDict(self._refs))
        self._archive.writestr(f"{self._root}data.pkl", buffer.getvalue())
        self._archive.writestr(f"{self._root}byteorder", "little")
        self._archive.writestr(f"{self._root}version", "3\n")
        self._archive.close()
