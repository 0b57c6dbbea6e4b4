"""What a generation is and the checks every way of generating shares (Generator.generate, generate_batch, the
server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from gptj_tvm.core.errors import GptjError


@dataclass
class Generation:
    text: str
    ids: list[int]
    prompt_ids: list[int]
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"


class TextStream:
    def __init__(self, events: Iterator[tuple[str, Generation]]):
        self._events = events
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for piece, self.result in self._events:
            if piece:
                yield piece


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold: an unfinished UTF-8 sequence, or the start of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


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
