"""The artifact folder: written here and read here, nowhere else.

    ARTIFACT/
      metadata.json            format version, config, dtype, target, TVM version, host ISA, weight hashes
      model.so                 the compiled library (export_library)
      params-0000N.safetensors the converted weights, in the compile dtype and the kernels' layout
      tokenizer.json           the checkpoint's tokenizer (GPT-2's byte-level BPE with its added tokens)

A compile writes into a temporary sibling folder (gptj_tvm.files.staging_dir) and renames it into place at
the end, so an interrupted compile leaves nothing that looks like an artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gptj_tvm.errors import GptjError
from gptj_tvm.targets.host import isa_features

FORMAT_VERSION = 2  # 2: tokenizer.json (added tokens) and stop_token_ids, where 1 had vocab.json/merges.txt
METADATA = "metadata.json"
LIBRARY = "model.so"
TOKENIZER = "tokenizer.json"


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


def write_metadata(folder: Path, *, config: dict, dtype: str, target: dict, device: str, tvm_version: str,
                   params: list[str], weight_files: list[str] | None, functions: list[str],
                   stop_token_ids: list[int], extra: dict | None = None):
    """weight_files None: an artifact compiled without weights (`compile --no-weights`), which
    `convert-weights` completes."""
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "dtype": dtype,
        "target": target,
        "device": device,
        "tvm_version": tvm_version,
        "host_isa": isa_features() if device == "cpu" else [],
        "library": LIBRARY,
        "functions": functions,
        "params": params,
        "tokenizer": TOKENIZER,
        "stop_token_ids": stop_token_ids,  # generation ends at any of these (eos, a fine-tune's end marker)
        **(extra or {}),
    }
    return save_metadata(folder, meta, weight_files)


def save_metadata(folder: Path, meta: dict, weight_files: list[str] | None) -> dict:
    """meta with the weight files' sizes and hashes (or marked pending), written to folder/metadata.json."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in weight_files or []}
    meta = {**meta, "weight_files": files, "weights_pending": weight_files is None,
            "weights_sha256": hashlib.sha256("".join(f["sha256"] for f in files.values()).encode()).hexdigest()}
    (folder / METADATA).write_text(json.dumps(meta, indent=2))
    return meta


def read_metadata(folder: Path) -> dict:
    """The artifact's metadata, checked against this host and this TVM; one clear error otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise GptjError(f"{folder}: no such artifact folder")
    path = folder / METADATA
    if not path.is_file():
        raise GptjError(f"{folder}: not a gptj-tvm artifact (no {METADATA})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GptjError(f"{path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise GptjError(f"{folder}: artifact format {meta.get('format_version') if isinstance(meta, dict) else '?'}"
                        f" is not {FORMAT_VERSION}; compile it again with this version of gptj-tvm")
    return meta


def check_compatible(meta: dict, folder: Path, tvm_version: str) -> None:
    if meta.get("weights_pending"):
        raise GptjError(f"{folder}: compiled without weights; add them with "
                        f"`gptj-tvm convert-weights MODEL_DIR {folder}`")
    if meta["tvm_version"] != tvm_version:
        raise GptjError(f"{folder}: built with TVM {meta['tvm_version']}, this is TVM {tvm_version}; "
                        "compile it again")
    if meta["device"] == "cpu":
        missing = sorted(set(meta["host_isa"]) - set(isa_features()))
        if missing:
            raise GptjError(f"{folder}: built for a CPU with {', '.join(missing)}, which this CPU lacks; "
                            "compile it on this machine")
    for name, info in meta["weight_files"].items():
        weight = folder / name
        if not weight.is_file():
            raise GptjError(f"{weight}: weight file missing from the artifact")
        if weight.stat().st_size != info["bytes"]:
            raise GptjError(f"{weight}: {weight.stat().st_size} bytes, the artifact says {info['bytes']} "
                            "(truncated or replaced)")
    for name in (meta["library"], meta["tokenizer"]):
        if not (folder / name).is_file():
            raise GptjError(f"{folder / name}: missing from the artifact")
