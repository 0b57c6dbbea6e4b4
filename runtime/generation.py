"""What a generation is and the checks every way of generating shares (Generator.generate, generate_batch, the
server): the one prompt check and the one check of sampling arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from gptj_tvm.core.errors import GptjError


class PromptTooLong(GptjError):
    """The prompt does not fit the positions a sequence has (the server answers 400 context_length_exceeded)."""


@dataclass
class Generation:
    text: str
    ids: list[int]
    prompt_ids: list[int]
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"  # "eos", "stop" (a stop string), "length" (max_new_tokens), "context"


class TextStream:
    def __init__(self, events: Iterator[tuple[str, Generation]]):
        self._events = events
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for piece, self.result in self._events:
            if piece:
                yield piece


def check_prompt(ids: Sequence[int], vocab_size: int, max_tokens: int, context: int) -> list[int]:
    """The prompt's ids as ints; GptjError for an empty one, one with an id outside the vocabulary, and
    PromptTooLong past max_tokens (the model's context, or less where a sequence holds fewer positions)."""
    ids = [int(i) for i in ids]
    if not ids:
        raise GptjError("the prompt is empty")
    if len(ids) > max_tokens:
        if max_tokens >= context:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, past the model's context of {context}")
        raise PromptTooLong(f"the prompt has {len(ids)} tokens; this engine holds at most {max_tokens} prompt "
                            f"tokens per sequence (context {context})")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GptjError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    if max_new_tokens < 1:
        raise GptjError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise GptjError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k < 0:
        raise GptjError(f"top_k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise GptjError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and seed < 0:
        raise GptjError(f"seed must be 0 or positive, got {seed}")


def finish_stats(stats: dict) -> None:
    stats["prefill_tokens_per_s"] = stats["prompt_tokens"] / stats["prefill_s"] if stats["prefill_s"] else 0.0
    steps = stats["decode_steps"]
    stats["decode_tokens_per_s"] = steps / stats["decode_s"] if steps and stats["decode_s"] else 0.0
