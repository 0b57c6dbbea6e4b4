"""Which requests run in the next step, and which of their tokens: the engine's policy, apart from running it.

`Scheduler.schedule()` returns a `StepPlan`, plain data: the rows of one batch (one token of every running
sequence, then within a token budget the next chunks of prompts being prefilled, oldest first) and which rows'
logits are sampled. Nothing here touches a model, so the policy is tested without one (tests/test_scheduler.py).

Policy: first come, first served. A waiting request takes a free slot at a step boundary (with the prefix cache,
the one holding most of its prompt: runtime/prefix_cache.py); a cancelled one leaves at the next boundary and
frees its slot; the queue holds at most `max_queue` requests beyond the free slots.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gptj_tvm.core.errors import GptjError

from .prefix_cache import SlotPrefixes, common_prefix


class QueueFull(GptjError):
    """The waiting queue is at its limit (the server answers 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # how many most likely alternatives to report with each token (0..5)
    min_tokens: int = 0  # the stop tokens cannot be sampled before this many tokens (vLLM's min_tokens)
    ignore_eos: bool = False  # a stop token does not end the sequence (vLLM's ignore_eos)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cached_tokens: int = 0  # of those, found in the prefix cache (not computed for this request)
    cancelled: bool = False
    first_token_s: float | None = None  # time to first token
    stats: dict = field(default_factory=lambda: {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0})

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    def cancel(self) -> None:
        """Leave at the next step boundary (a client that went away); its slot is freed then."""
        self.cancelled = True

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    @property
    def position(self) -> int:
        """Where the next token goes in the sequence."""
        return self.prefilled + max(0, len(self.tokens) - 1) if self.prompt_done else self.prefilled


@dataclass(frozen=True)
class Chunk:
    """Tokens of one request at positions start, start + 1, ...: a prompt piece, or one decode token."""
    request: Request
    tokens: list[int]
    start: int
    prompt: bool  # a prompt piece (the request's prefill), not a decode token
    sampled: bool  # its last row's logits give the request's next token


@dataclass
class StepPlan:
    chunks: list[Chunk]
    cancelled: list[Request]  # left the engine at this boundary
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (from slot, to slot, rows): before the step

    @property
    def ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.tokens]

    @property
    def slots(self) -> list[int]:
        return [c.request.slot for c in self.chunks for _ in c.tokens]

    @property
    def positions(self) -> list[int]:
        return [c.start + i for c in self.chunks for i in range(len(c.tokens))]

    @property
    def logit_rows(self) -> list[int]:
        """The row of every sampled chunk's last token, in chunk order."""
        rows, end = [], 0
        for chunk in self.chunks:
            end += len(chunk.tokens)
            if chunk.sampled:
                rows.append(end - 1)
        return rows

    @property
    def sampled(self) -> list[Request]:
        return [c.request for c in self.chunks if c.sampled]

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.chunks]


class Scheduler:
    """Waiting and running requests, slots, and the step plan. Not thread-safe: the engine holds its lock."""

    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int | None, prefix_cache: bool = False):
        """prefill_chunk: prompt tokens per step beside the decode rows (None: a whole prompt at once);
        prefix_cache: slots keep their rows for later prompts that begin with the same tokens."""
        if max_batch < 1 or max_queue < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise GptjError("max_batch and prefill_chunk must be at least 1, max_queue at least 0")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free = list(range(max_batch - 1, -1, -1))
        self.prefixes = SlotPrefixes(max_batch) if prefix_cache else None
        self._ids = itertools.count(1)

    def add(self, request: Request) -> Request:
        if len(self.waiting) - len(self.free) >= self.max_queue:  # the free slots take some at the next step
            raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
        request.id = next(self._ids)
        self.waiting.append(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Drop the cancelled, admit waiting requests into free slots, then plan one step's rows."""
        cancelled = [r for r in (*self.running, *self.waiting) if r.cancelled]
        for request in cancelled:
            self.finish(request, "cancelled")
        copies = []
        while self.free and self.waiting:
            if self.prefixes is not None and self._worth_waiting(self.waiting[0]):
                break  # first come, first served: those behind it wait too, for a step or a few
            request = self.waiting.popleft()
            if self.prefixes is None:
                request.slot = self.free.pop()
            else:
                placement = self.prefixes.place(request.prompt_ids, self.free, [r.slot for r in self.running])
                self.free.remove(placement.slot)
                request.slot = placement.slot
                request.prefilled = request.cached_tokens = placement.reused
                if placement.copy_from is not None:
                    copies.append((placement.copy_from, placement.slot, placement.reused))
            self.running.append(request)
        chunks = [Chunk(r, [r.tokens[-1]], r.position, prompt=False, sampled=True)
                  for r in self.running if r.prompt_done]
        budget = self.prefill_chunk
        for request in self.running:
            left = len(request.prompt_ids) - request.prefilled
            if left == 0 or budget == 0:
                continue
            take = left if budget is None else min(left, budget)
            start = request.prefilled
            chunks.append(Chunk(request, request.prompt_ids[start:start + take], start, prompt=True,
                                sampled=start + take == len(request.prompt_ids)))
            budget = None if budget is None else budget - take
        return StepPlan(chunks, cancelled, copies)

    def _worth_waiting(self, request: Request) -> bool:
        """Whether a running request is still prefilling a longer prefix of this prompt than any slot holds
        (users arriving together behind one system prompt): admitted now, this one would compute those rows a
        second time, and share the step's prefill budget with the first, which then takes longer too."""
        limit = len(request.prompt_ids) - 1
        have = self.prefixes.longest(request.prompt_ids, self.free + [r.slot for r in self.running])
        coming = max((min(common_prefix(request.prompt_ids, r.prompt_ids), limit)
                      for r in self.running if not r.prompt_done), default=0)
        return coming > have

    def advance(self, plan: StepPlan) -> None:
        """The plan ran: its rows are in the caches."""
        for chunk in plan.chunks:
            if chunk.prompt:
                chunk.request.prefilled = chunk.start + len(chunk.tokens)
            if self.prefixes is not None:
                self.prefixes.wrote(chunk.request.slot, chunk.start, chunk.tokens)

    def failed(self, plan: StepPlan) -> None:
        """The plan's step failed: what its slots hold is not known."""
        if self.prefixes is not None:
            for slot in {c.request.slot for c in plan.chunks} | {dst for _, dst, _ in plan.copies}:
                self.prefixes.forget(slot)

    def finish(self, request: Request, reason: str) -> None:
        """The request leaves; a slot it held is free for the next."""
        if request in self.running:
            self.running.remove(request)
            self.free.append(request.slot)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = reason

    def stats(self) -> dict:
        prefixes = self.prefixes
        return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.max_batch,
                "slots_used": self.max_batch - len(self.free),
                "kv_tokens_used": sum(r.position + 1 for r in self.running),
                "prefix_cache_queries": prefixes.queried if prefixes else 0,
                "prefix_cache_hits": prefixes.hits if prefixes else 0}
