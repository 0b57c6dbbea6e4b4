"""Prompts already computed are not prefilled again: which tokens' keys and values each slot of the batched engine
still holds, and where a new request's prompt can start.

The design is slot affinity with longest-common-prefix reuse, as llama.cpp's server does, plus a copy between
slots. A slot keeps the rows of the last sequence that ran in it (its prompt and the tokens it decoded) after that
sequence leaves, so the slot caches are the prefix cache: it lives inside the memory `--kv-cache-gb` gave, and
needs no second copy of any row, no block table and no change to the kernels. A new request takes the free slot
whose tokens share the longest prefix with its prompt. Where that prefix is in a running sequence's slot, or in a
free slot that holds more than it (an idle conversation whose next turn may come), the request takes the least
recently used free slot and the engine copies the prefix's rows into it before the step (a memory copy: 28
layers x 2 x 4096 values per token for the 6B, far less than prefilling them). So idle slots' rows are evicted
least recently used.

Why not hashed blocks (vLLM's): the compiled step addresses a slot's rows as one contiguous range, so blocks
would need a gather in every attention kernel; chat turns and shared system prompts are whole prefixes, which
slots already capture. The rows are exact: a row's keys and values depend only on the tokens up to it, and every
kernel computes a row the same way whatever else is in its step, so a reused row is bitwise the row a cold
prefill computes. The last prompt token is always run, since its logits give the first new token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Placement:
    slot: int  # the free slot the request takes
    reused: int  # prompt tokens whose rows it need not compute
    copy_from: int | None = None  # the slot those rows are copied from (None: they are in `slot` already)


class SlotPrefixes:
    def __init__(self, slots: int):
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # whose rows are valid in each slot
        self._clock = itertools.count()
        self.last_used = [next(self._clock) for _ in range(slots)]
        self.queried = self.hits = 0  # prompt tokens looked up, and found

    def place(self, prompt: list[int], free: list[int], busy: list[int]) -> Placement:
        """Where a prompt goes. The slot holding its longest prefix (a free one on ties) is the source. A free
        source is taken if the request loses nothing of what it holds (its rows are all that prefix) or it is the
        least recently used anyway; else the prefix is copied into the least recently used free slot, so a busy
        sequence, or an idle conversation whose next turn may come, keeps its rows."""
        limit = len(prompt) - 1  # the last prompt token is always run: its logits give the first new token
        found = {slot: min(common_prefix(prompt, self.tokens[slot]), limit) for slot in free + busy}
        self.queried += len(prompt)
        source = max(free + busy, key=lambda s: (found[s], s in free, -self.last_used[s]))
        reused = found[source]
        oldest = min(free, key=lambda s: self.last_used[s])
        if reused == 0:
            placement = Placement(oldest, 0)
        elif source in free and (len(self.tokens[source]) <= reused + 1 or source == oldest):
            placement = Placement(source, reused)
        else:
            placement = Placement(oldest, reused, source)
        self.hits += placement.reused
        self.take(placement)
        return placement

    def longest(self, prompt: list[int], slots: list[int]) -> int:
        """The most of prompt's rows (never its last) any of these slots holds."""
        return max((min(common_prefix(prompt, self.tokens[s]), len(prompt) - 1) for s in slots), default=0)

    def take(self, placement: Placement) -> None:
        source = placement.slot if placement.copy_from is None else placement.copy_from
        self.tokens[placement.slot] = self.tokens[source][:placement.reused]
        self.last_used[placement.slot] = next(self._clock)

    def wrote(self, slot: int, start: int, tokens: list[int]) -> None:
        """A step computed the rows of tokens at start, start + 1, ... in slot."""
        held = self.tokens[slot]
        del held[start:]  # in place: a decode step appends one token to a list of up to the context
        held.extend(tokens)
        self.last_used[slot] = next(self._clock)

    def forget(self, slot: int) -> None:
        """Its rows are not trusted (a step that failed)."""
        self.tokens[slot] = []
