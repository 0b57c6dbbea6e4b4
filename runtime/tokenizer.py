"""The artifact's tokenizer (tokenizer.json, written by compile from the checkpoint's files), through the
`tokenizers` package."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from gptj_tvm.core.errors import GptjError


class ArtifactTokenizer:
    def __init__(self, path: Path):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001  (tokenizers raises a bare Exception for a bad file)
            raise GptjError(f"{path}: not a readable tokenizer ({err})") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode for each text; unlike encode, it lets other Python threads run meanwhile (the server's loop)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    @property
    def longest_token(self) -> int:
        """The most characters one token stands for (byte-level tokens: at least one byte per character)."""
        return max(len(token) for token in self._tokenizer.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int]) -> str:
        """Text of ids without the special tokens; ids the tokenizer lacks (the rows GPT-J pads its vocab with
        where a checkpoint has no added tokens for them) decode to nothing."""
        known = [i for i in ids if i >= 0 and self._tokenizer.id_to_token(i) is not None]
        return self._tokenizer.decode(known, skip_special_tokens=True)
