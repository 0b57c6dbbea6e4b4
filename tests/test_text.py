"""The one text path (runtime/text.py) against the tokenizer's own decode of the whole sequence: the pieces join
to it, cut before the first stop string wherever the tokens split it, and never hand out half a character."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gptj_tvm.runtime.text import IncrementalText

GPT2 = Path(__file__).resolve().parents[1] / "gptj_tvm" / "data" / "gpt2"  # GPT-2's (GPT-J's) BPE files


class Decoder:
    """GPT-2's byte-level BPE, built by the tokenizers library from the vocabulary and merges."""

    def __init__(self):
        self.tokenizer = Tokenizer(models.BPE.from_file(str(GPT2 / "encoder.json"), str(GPT2 / "vocab.bpe")))
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()

    def encode(self, text):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tok():
    return Decoder()


def run(tok, ids, stops):
    text = IncrementalText(tok, stops)
    pieces = [text.add(i) for i in ids if not text.stopped]
    pieces.append(text.finish("length"))
    return text, pieces


@pytest.mark.parametrize("sentence", ["The quick brown fox jumps over the lazy dog.", "naïve café — 東京 🙂 ok",
                                      "a\n\n### End\n\nb"])
def test_pieces_join_to_the_whole_decode_without_stops(tok, sentence):
    ids = tok.encode(sentence)
    text, pieces = run(tok, ids, [])
    assert "".join(pieces) == tok.decode(ids) and text.finish_reason == "length"
    assert all("\ufffd" not in piece for piece in pieces[:-1])  # half a character is held back


@pytest.mark.parametrize("sentence,stops", [("The quick brown fox jumps over the lazy dog.", ["fox j"]),
                                            ("The quick brown fox jumps over the lazy dog.", ["lazy", " quick"]),
                                            ("naïve café — 東京 🙂 ok", ["京 🙂"]),
                                            ("a\n\n### End\n\nb", ["### End"])])
def test_a_stop_string_across_tokens_cuts_the_text_before_it(tok, sentence, stops):
    ids = tok.encode(sentence)
    full = tok.decode(ids)
    cut = min(full.find(s) for s in stops if s in full)
    text, pieces = run(tok, ids, stops)
    assert text.finish_reason == "stop" and "".join(pieces) == text.text == full[:cut]
    # the token that completed the stop string is the last one taken; a token is kept if its first byte comes
    # before the cut's (a byte-level token's string has one character per byte)
    assert len(text.ids) == next(n for n in range(1, len(ids) + 1) if any(s in tok.decode(ids[:n]) for s in stops))
    starts = [sum(len(tok.tokenizer.id_to_token(i)) for i in ids[:n]) for n in range(len(text.ids))]
    assert text.kept_tokens() == sum(1 for start in starts if start < len(full[:cut].encode()))


def test_offsets_are_where_each_tokens_text_starts(tok):
    ids = tok.encode("Hello there, general Kenobi")
    text, _ = run(tok, ids, [])
    assert text.offsets == [len(tok.decode(ids[:n])) for n in range(len(ids))]
