"""The artifact folder: written here and read here, nowhere else.

    ARTIFACT/
      metadata.json            format version, config, dtype, target, TVM version, host ISA, weight hashes
      model.so                 the compiled library (export_library)
      params-0000N.safetensors the converted weights, in the compile dtype and the kernels' layout
      tokenizer.json           the checkpoint's tokenizer (GPT-2's byte-level BPE with its added tokens)

`ArtifactMetadata` is metadata.json: compile fills one in, and everything else reads it through this class.
A compile writes into a temporary sibling folder (gptj_tvm.core.files.staging_dir) and renames it into place at
the end, so an interrupted compile leaves nothing that looks like an artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from gptj_tvm.core.errors import GptjError
from gptj_tvm.frontend.config import GPTJConfig
from gptj_tvm.frontend.layouts import LayoutPlan
from gptj_tvm.targets.host import isa_features

# 4: the library carries its manifest; 3: the linear layouts as a plan ("layouts"); 2: tokenizer.json (added tokens)
# and stop_token_ids
FORMAT_VERSION = 4
METADATA = "metadata.json"
LIBRARY = "model.so"
TOKENIZER = "tokenizer.json"
# a function of the library returning, as JSON, what it was compiled for (library_manifest): loading compares
# metadata.json and the weights with it, since a library run on another shape reads past its buffers
MANIFEST_FUNCTION = "artifact_manifest"


@dataclasses.dataclass
class ArtifactMetadata:
    """What compile recorded about an artifact; `weight_files` and its hashes are filled in when it is saved."""
    config: GPTJConfig  # metadata.json holds its to_dict()
    dtype: str
    target: dict
    device: str  # cpu, cuda, vulkan
    tvm_version: str
    params: list[str]  # the weights in the order the compiled functions take them
    functions: list[str]
    stop_token_ids: list[int]  # generation ends at any of these (eos, a fine-tune's end marker)
    fuse_block: bool
    layouts: dict  # frontend.layouts.LayoutPlan.to_dict(): each linear's layout
    prefill_buckets: dict[str, str] = dataclasses.field(default_factory=dict)  # length -> static prefill function
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel -> the schedule it got
    kernel_calls: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # function -> kernels, in order
    compile_timings: dict[str, float] = dataclasses.field(default_factory=dict)
    device_features: list[str] = dataclasses.field(default_factory=list)  # what the GPU must support
    tuning_db: str | None = None
    source: dict = dataclasses.field(default_factory=dict)  # what compile read: weights' format, tokenizer
    host_isa: list[str] = dataclasses.field(default_factory=list)  # the CPU features the library needs
    library: str = LIBRARY
    tokenizer: str = TOKENIZER
    weight_files: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> bytes, sha256
    weights_pending: bool = True  # compiled with --no-weights: convert-weights completes it
    weights_sha256: str = ""
    small_files: dict[str, dict] = dataclasses.field(default_factory=dict)  # library, tokenizer -> bytes, sha256
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.config, dict):
            self.config = GPTJConfig(**self.config)

    @property
    def kv_bytes_per_position(self) -> int:
        """KV-cache bytes one token takes (the caches are in the artifact's dtype)."""
        return self.config.kv_values_per_position * (4 if self.dtype == "float32" else 2)

    @property
    def plan(self) -> LayoutPlan:
        return LayoutPlan.from_dict(self.layouts)

    @property
    def quantization(self) -> str | None:
        return self.plan.quantization

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def weight_bytes(self) -> int:
        return sum(info["bytes"] for info in self.weight_files.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, folder: Path, weight_files: list[str] | None) -> "ArtifactMetadata":
        """Written to folder/metadata.json with the weight files' sizes and hashes (None: weights pending)."""
        files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                 for name in weight_files or []}
        small = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                 for name in (self.library, self.tokenizer)}
        meta = dataclasses.replace(self, weight_files=files, weights_pending=weight_files is None, small_files=small,
                                   weights_sha256=hashlib.sha256("".join(f["sha256"] for f in files.values())
                                                                 .encode()).hexdigest())
        (folder / METADATA).write_text(json.dumps(meta.to_dict(), indent=2))
        return meta

    @classmethod
    def read(cls, folder) -> "ArtifactMetadata":
        """The artifact's metadata; one clear error for a missing, unreadable or older artifact."""
        folder = Path(folder)
        if not folder.exists():
            raise GptjError(f"{folder}: no such artifact folder")
        path = folder / METADATA
        if not path.is_file():
            raise GptjError(f"{folder}: not a gptj-tvm artifact (no {METADATA})")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise GptjError(f"{path}: unreadable ({err})") from None
        version = raw.get("format_version") if isinstance(raw, dict) else "?"
        if version != FORMAT_VERSION:
            raise GptjError(f"{folder}: artifact format {version} is not {FORMAT_VERSION}; "
                            "compile it again with this version of gptj-tvm")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in fields})
        except TypeError as err:
            raise GptjError(f"{path}: incomplete metadata ({err})") from None

    def check_library(self, folder: Path, manifest: dict) -> None:
        """Refuses, in one line, metadata.json that says other than the library (library_manifest) does."""
        ours = library_manifest(self.config, self.dtype, self.layouts, self.fuse_block, self.functions, {})
        for key in ours:
            if key != "params" and ours[key] != manifest.get(key):
                raise GptjError(f"{folder / METADATA} does not match {self.library}: "
                                f"{_differences(key, ours[key], manifest.get(key))}; compile it again")
        if self.params != [name for name, _, _ in manifest.get("params", [])]:
            raise GptjError(f"{folder / METADATA}: its weights are not the ones {self.library} takes; compile it "
                            "again")

    def check_weights(self, folder: Path, manifest: dict, found: dict[str, tuple[list[int], str]]) -> None:
        """Refuses, in one line, weights (name -> shape, dtype, from the files' headers) other than the library's."""
        for name, shape, dtype in manifest["params"]:
            if name not in found:
                raise GptjError(f"{folder}: weight {name} missing from the artifact")
            if list(found[name][0]) != shape or found[name][1] != dtype:
                raise GptjError(f"{folder}: weight {name} is {found[name][1]} {list(found[name][0])}, the library "
                                f"takes {dtype} {shape}; compile it again")

    def check_compatible(self, folder: Path, tvm_version: str, verify: bool = False) -> None:
        """Refuses, in one line, an artifact this machine cannot run as it is. Sizes are always checked, and the
        small files' sha256; with `verify` the weights' sha256 too (about 1 s a GB of weights)."""
        if self.weights_pending:
            raise GptjError(f"{folder}: compiled without weights; add them with "
                            f"`gptj-tvm convert-weights MODEL_DIR {folder}`")
        if self.tvm_version != tvm_version:
            raise GptjError(f"{folder}: built with TVM {self.tvm_version}, this is TVM {tvm_version}; "
                            "compile it again")
        if self.device == "cpu":
            missing = sorted(set(self.host_isa) - set(isa_features()))
            if missing:
                raise GptjError(f"{folder}: built for a CPU with {', '.join(missing)}, which this CPU lacks; "
                                "compile it on this machine")
        for name, info in self.weight_files.items():
            weight = folder / name
            if not weight.is_file():
                raise GptjError(f"{weight}: weight file missing from the artifact")
            if weight.stat().st_size != info["bytes"]:
                raise GptjError(f"{weight}: {weight.stat().st_size} bytes, the artifact says {info['bytes']} "
                                "(truncated or replaced)")
        for name in (self.library, self.tokenizer):
            if not (folder / name).is_file():
                raise GptjError(f"{folder / name}: missing from the artifact")
        # checked whole, being small: a truncated library would otherwise be mapped and die with SIGBUS
        for name, info in self.small_files.items():
            if (folder / name).stat().st_size != info["bytes"] or file_sha256(folder / name) != info["sha256"]:
                raise GptjError(f"{folder / name}: not the file compile wrote (its size or sha256 differs: "
                                "damaged or replaced); compile it again")
        if verify:
            for name, info in self.weight_files.items():
                if file_sha256(folder / name) != info["sha256"]:
                    raise GptjError(f"{folder / name}: its sha256 is not the one compile recorded (damaged or "
                                    "replaced); compile it again")


def library_manifest(config: GPTJConfig, dtype: str, layouts: dict, fuse_block: bool, functions: list[str],
                     params: dict[str, tuple[list[int], str]]) -> dict:
    """What a library is compiled for: the model's config, dtype and layouts, its functions, and its weights
    (name -> shape, dtype) in the order it takes them. compile puts it in the library (MANIFEST_FUNCTION)."""
    return {"config": config.to_dict(), "dtype": dtype, "layouts": layouts, "fuse_block": fuse_block,
            "functions": list(functions), "params": [[name, list(shape), dtype] for name, (shape, dtype)
                                                     in params.items()]}


def _differences(key: str, ours, theirs) -> str:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        return ", ".join(f"{key}.{k} is {ours.get(k)!r} there, {theirs.get(k)!r} in the library" for k in changed[:3])
    return f"{key} is {ours!r} there, {theirs!r} in the library"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_replaceable(out_dir: Path) -> None:
    """An existing artifact may be replaced by a new compile; any other non-empty folder may not."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / METADATA).is_file() and any(out_dir.iterdir()):
        raise GptjError(f"{out_dir}: exists and is not an artifact; refusing to overwrite it")
