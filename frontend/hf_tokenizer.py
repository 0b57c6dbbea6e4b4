"""The tokenizer transformers builds from a checkpoint folder, as one `tokenizers` Tokenizer, and the ids that
end a generation.

transformers (`AutoTokenizer.from_pretrained(folder)`) reads `tokenizer.json` when the folder has one. Otherwise
it builds GPT-2's byte-level BPE from vocab.json + merges.txt and adds the tokens of `added_tokens.json` at the
ids that file maps them to, whatever its order, and the special tokens of `special_tokens_map.json` (an
`additional_special_tokens` entry such as Dolly's `### Instruction:` is one token, never split). The artifact
keeps the result as one tokenizer.json, so the runtime loads exactly what compile built.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from gptj_tvm.core.errors import GptjError

from .config import GPTJConfig

END_OF_TEXT = "<|endoftext|>"
# Instruction-tuned checkpoints that end an answer with a token of their own, not with eos (Dolly's pipeline
# stops at the id of `### End`).
END_MARKERS = ("### End",)


def packaged_tokenizer_dir() -> Path:
    """The GPT-2 tokenizer files shipped with the package (encoder.json, vocab.bpe): GPT-J's own. Package data
    of gptj_tvm (setup.cfg), found through importlib wherever the package is installed."""
    return Path(str(resources.files("gptj_tvm").joinpath("data", "gpt2")))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise GptjError(f"{path}: not a readable JSON file ({err})") from None


def _content(token) -> str:
    """A special token as special_tokens_map.json writes it: a string or {"content": ...}."""
    return token["content"] if isinstance(token, dict) else str(token)


def special_tokens(model_dir: Path) -> list[str]:
    """The special tokens of special_tokens_map.json (bos, eos, unk, pad and additional ones), in file order."""
    path = Path(model_dir) / "special_tokens_map.json"
    found = [END_OF_TEXT]
    if path.is_file():
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise GptjError(f"{path}: expected a JSON object")
        for key, value in raw.items():
            for token in (value if key == "additional_special_tokens" and isinstance(value, list) else [value]):
                if token is not None:
                    found.append(_content(token))
    return list(dict.fromkeys(found))


def _bpe_files(model_dir: Path) -> tuple[Path, Path]:
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return vocab, merges
    shipped = packaged_tokenizer_dir()
    return shipped / "encoder.json", shipped / "vocab.bpe"


def build_tokenizer(model_dir: Path) -> tuple[Tokenizer, dict]:
    """(the tokenizer, what it was built from: source files, added and special token counts)."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001  (tokenizers raises a bare Exception for a bad file)
            raise GptjError(f"{model_dir / 'tokenizer.json'}: not a readable tokenizer ({err})") from None
        added = tokenizer.get_added_tokens_decoder()
        return tokenizer, {"source": "tokenizer.json", "added_tokens": len(added),
                           "special_tokens": sorted(t.content for t in added.values() if t.special)}
    vocab_path, merges_path = _bpe_files(model_dir)
    vocab = _read_json(vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GptjError(f"{merges_path}: unreadable ({err})") from None
    if not isinstance(vocab, dict):
        raise GptjError(f"{vocab_path}: expected a JSON object of token -> id")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    added = _read_json(model_dir / "added_tokens.json") if (model_dir / "added_tokens.json").is_file() else {}
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise GptjError(f"{model_dir / 'added_tokens.json'}: expected a JSON object of token -> id")
    specials = special_tokens(model_dir)
    # An added token in the model's vocab keeps its id there; tokens named only in special_tokens_map.json
    # come after every other id, as transformers appends them.
    full = {**vocab, **added}
    for token in specials:
        full.setdefault(token, max(full.values(), default=-1) + 1)
    tokenizer = Tokenizer(models.BPE(full, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    plain = sorted((t for t in added if t not in specials), key=added.get)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in sorted(specials, key=full.get)])
    source = "vocab.json + merges.txt" if vocab_path.parent == model_dir else "GPT-2's vocab and merges (packaged)"
    return tokenizer, {"source": source, "added_tokens": len(added), "special_tokens": specials}


def stop_token_ids(model_dir: Path, config: GPTJConfig, tokenizer: Tokenizer) -> list[int]:
    """The ids that end a generation: the config's eos, generation_config.json's eos_token_id (an id or a
    list) and the checkpoint's end marker where it has one (END_MARKERS), each one the model can output."""
    ids = [config.eos_token_id]
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():
        raw = _read_json(generation)
        eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
        ids += eos if isinstance(eos, list) else [eos]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    ids += [vocab[marker] for marker in END_MARKERS if marker in vocab]
    return sorted({int(i) for i in ids if isinstance(i, int) and 0 <= i < config.vocab_size})
