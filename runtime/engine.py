"""The one engine: every way of generating (`Generator.generate`, `.stream`, `.generate_batch`, the server) submits
requests here, and each step is three: schedule (runtime/scheduler.py: which rows), execute (runtime/executors.py:
the model on them), update (sample the logits, hand out events, finish what is done).

With the batched step, a step takes one token of every running sequence and, within a token budget, the next chunk
of a waiting prompt (chunked prefill): the GEMMs read each weight once for all the rows, and a long prompt never
stalls the running streams for more than one chunk. A sequence's logits do not depend on its neighbours (the per-row
arithmetic of every kernel is the same whatever else is in the batch), and its sampling has its own random
generator, so a request gets the tokens it would get alone.

The engine runs on the caller's thread (`step`, `run_until_idle`) or on a thread of its own (`start`, the server):
the compiled step releases the GIL, so the server keeps answering meanwhile. Events reach each request's
`on_event` on the engine's thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .generation import check_prompt
from .sampling import next_token
from .scheduler import QueueFull, Request, SamplingParams, Scheduler, StepPlan

__all__ = ["Engine", "FinishEvent", "QueueFull", "Request", "SamplingParams", "TokenEvent"]


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None  # the token's log-probability under the model (temperature 1), with logprobs
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "eos", "length" (max_tokens), "context" (the sequence's positions are full), "cancelled", "error"
    message: str = ""


class Engine:
    def __init__(self, model, executor, max_queue: int = 64, prefill_chunk: int | None = None,
                 prefix_cache: bool = False):
        """executor: runtime/executors.py's, over `model`; prefill_chunk: prompt tokens per step beside the decode
        rows (None: whole prompts); prefix_cache: reuse the rows slots still hold (runtime/prefix_cache.py), where
        the executor's sequences share slot caches."""
        self.model, self.executor = model, executor
        self.scheduler = Scheduler(executor.max_batch, max_queue, prefill_chunk,
                                   prefix_cache=prefix_cache and executor.copies_rows)
        self.stop_token_ids = model.stop_token_ids
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self.steps = 0

    @property
    def positions(self) -> int:
        """Positions one sequence may fill (prompt and generated tokens)."""
        return self.executor.positions

    # -- requests ----------------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids) -> list[int]:
        """The prompt as ids, or GptjError (PromptTooLong past what a sequence holds here)."""
        return check_prompt(prompt_ids, self.model.vocab_size, self.executor.max_prompt_tokens, self.model.context)

    def submit(self, prompt_ids, params: SamplingParams, on_event: Callable) -> Request:
        """Queue a request; raises GptjError for one that can never run and QueueFull when the queue is full."""
        request = Request(self.check_prompt(prompt_ids), params, on_event)
        with self._lock:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            self.scheduler.add(request)
            self._lock.notify()
        return request

    def stats(self) -> dict:
        with self._lock:
            stats = self.scheduler.stats()
        return {**stats, "kv_tokens": self.executor.max_batch * self.positions, "steps": self.steps}

    # -- driving it --------------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Run steps on this thread until no request is waiting or running."""
        while self.step():
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gptj-tvm engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Take no new requests, let the running and waiting ones finish for up to drain_seconds, cancel the
        rest, and stop the thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and self.scheduler.has_work and self._thread is not None:
            time.sleep(0.05)
        with self._lock:
            for request in [*self.scheduler.running, *self.scheduler.waiting]:
                request.cancel()
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.scheduler.has_work:  # no thread, or it did not get to them
            self.step()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self.scheduler.has_work or self._stop):
                    self._lock.wait()
                if self._stop and not self.scheduler.has_work:
                    return
            self.step()

    # -- one step: schedule, execute, update ---------------------------------------------------------------
    def step(self) -> bool:
        """Returns whether any request is left."""
        with self._lock:
            plan = self.scheduler.schedule()
        for request in plan.cancelled:
            self.executor.release(request)
            _emit(request, FinishEvent("cancelled"))
        if not plan.chunks:
            with self._lock:
                return self.scheduler.has_work
        start = time.perf_counter()
        try:
            logits = self.executor.execute(plan)
        except Exception as err:  # noqa: BLE001  (one failed step ends its requests, never the engine)
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            with self._lock:
                self.scheduler.failed(plan)
            for request in plan.requests:
                self._finish(request, "error", message)
            with self._lock:
                return self.scheduler.has_work
        self._update(plan, logits, time.perf_counter() - start)
        with self._lock:
            return self.scheduler.has_work

    def _update(self, plan: StepPlan, logits: np.ndarray, seconds: float) -> None:
        self.steps += 1
        with self._lock:
            self.scheduler.advance(plan)
        for chunk in plan.chunks:
            stats = chunk.request.stats
            if chunk.prompt:
                stats["prefill_s"] += seconds
            else:
                stats["decode_s"] += seconds
                stats["decode_steps"] += 1
        for request, row in zip(plan.sampled, logits):
            try:
                self._sample(request, row)
            except Exception as err:  # noqa: BLE001  (a bad row, e.g. NaN logits, ends its request only)
                self._finish(request, "error", f"sampling failed: {err}")

    def _sample(self, request: Request, logits: np.ndarray) -> None:
        p = request.params
        allowed = logits
        if len(request.tokens) < p.min_tokens:  # vLLM's min_tokens: the stop tokens are not sampled yet
            allowed = logits.copy()
            allowed[[t for t in self.stop_token_ids if t < logits.size]] = -np.inf
        token = next_token(allowed, request.rng, p.temperature, p.top_k, p.top_p)  # logprobs: the model's own
        request.tokens.append(token)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.submitted
        event = TokenEvent(token)
        if p.logprobs is not None:
            shifted = logits.astype(np.float64) - logits.max()
            logp = shifted - np.log(np.exp(shifted).sum())
            top = np.argsort(-logp, kind="stable")[:p.logprobs] if p.logprobs else []
            event = TokenEvent(token, float(logp[token]), [(int(i), float(logp[i])) for i in top])
        _emit(request, event)
        if token in self.stop_token_ids and not p.ignore_eos:
            self._finish(request, "eos")
        elif len(request.tokens) >= p.max_tokens:
            self._finish(request, "length")
        elif len(request.prompt_ids) + len(request.tokens) >= self.positions:
            self._finish(request, "context")

    def _finish(self, request: Request, reason: str, message: str = "") -> None:
        with self._lock:
            self.scheduler.finish(request, reason)
        self.executor.release(request)
        _emit(request, FinishEvent(reason, message))


def _emit(request: Request, event: TokenEvent | FinishEvent) -> None:
    """Hand an event to its request's callback; a callback that fails cancels its own request, never the engine."""
    try:
        request.on_event(event)
    except Exception:  # noqa: BLE001  (the caller's code: whatever it raises stays with its request)
        request.cancel()
