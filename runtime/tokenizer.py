"""GPT-2's byte-level BPE (GPT-J's tokenizer), through the `tokenizers` package."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from gptj_tvm.errors import GptjError

END_OF_TEXT = "<|endoftext|>"


class GPT2Tokenizer:
    def __init__(self, vocab_path: Path, merges_path: Path):
        try:
            vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
            lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as err:
            raise GptjError(f"tokenizer files unreadable ({err})") from None
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        bpe = Tokenizer(models.BPE(vocab, merges))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
        self._tokenizer = bpe
        self.vocab_size = bpe.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids; ids the tokenizer lacks (GPT-J's padded rows 50257..50399) decode to nothing."""
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(known, skip_special_tokens=True)
