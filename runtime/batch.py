"""Continuous batching: many sequences decoded together, one weight read per step for all of them.

A `BatchEngine` owns slot KV caches ([slots, slot_len, n_head, head_dim] per layer and for keys and values) and
runs the artifact's `step` function. Each step takes one token of every running sequence (batched decode) and,
within a token budget, the next chunk of a waiting prompt (chunked prefill), as the rows of one batch: the GEMMs
read each weight once for all the rows, and a long prompt never stalls the running streams for more than one
chunk. Requests join at step boundaries when a slot is free (first come, first served) and leave when done or
cancelled; a sequence's logits do not depend on its neighbours (the per-row arithmetic of every kernel is the
same whatever else is in the batch), and its sampling has its own random generator, so a request gets the
tokens `Generator.generate` gives it alone.

The engine runs on the caller's thread (`run_until_idle`, the Python API's `generate_batch`) or on a thread
of its own (`start`, the server): the compiled step releases the GIL, so the server keeps answering meanwhile.
Events reach each request's `on_event` on the engine's thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gptj_tvm.core.errors import GptjError

from .generation import Generation, check_sampling
from .sampling import next_token

DEFAULT_PREFILL_CHUNK = 32  # prompt tokens per step beside the decode rows: at most a few decode steps long


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


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None  # the token's log-probability under the model (temperature 1), with logprobs
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "eos", "length" (max_tokens), "context" (the slot is full), "cancelled", "error"
    message: str = ""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent | FinishEvent], None]
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cancelled: bool = False
    first_token_s: float | None = None  # time to first token

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    def cancel(self) -> None:
        """Leave at the next step boundary (a client that went away); its slot is freed then."""
        self.cancelled = True

    @property
    def position(self) -> int:
        """Where the next token goes in the sequence."""
        return self.prefilled + max(0, len(self.tokens) - 1) if self.prefilled == len(self.prompt_ids) \
            else self.prefilled


class BatchEngine:
    def __init__(self, generator, max_batch: int = 8, max_queue: int = 64, slot_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if "step" not in generator.meta.functions:
            raise GptjError(f"{generator.folder}: has no batched step function (compile it again with this "
                            "version of gptj-tvm; CPU and CUDA artifacts have one)")
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise GptjError("max_batch and prefill_chunk must be at least 1, max_queue at least 0")
        self.gen = generator
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        import tvm  # here, not at the top: the CLI reads this module's defaults before it chooses TVM's library

        self.slot_len = min(slot_len or generator.context, generator.context)
        c = generator.config
        shape = (max_batch, self.slot_len, c["n_head"], c["n_embd"] // c["n_head"])
        self._caches = tvm.runtime.convert([tvm.runtime.empty(shape, generator.meta.dtype, generator.device)
                                            for _ in range(2 * c["n_layer"])])
        self.cache_bytes = 2 * c["n_layer"] * int(np.prod(shape)) * np.dtype(_itemsize(generator.meta.dtype)).itemsize
        self._free = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self.steps = 0

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[TokenEvent | FinishEvent], None]) -> Request:
        """Queue a request; raises GptjError for one that can never run and QueueFull when the queue is full."""
        if not prompt_ids:
            raise GptjError("the prompt is empty")
        if len(prompt_ids) >= self.slot_len:
            raise GptjError(f"the prompt has {len(prompt_ids)} tokens; this server holds at most "
                            f"{self.slot_len - 1} prompt tokens per sequence (context {self.gen.context})")
        bad = [i for i in prompt_ids if not 0 <= i < self.gen.vocab_size]
        if bad:
            raise GptjError(f"token id {bad[0]} is outside the vocabulary (0..{self.gen.vocab_size - 1})")
        request = Request(list(prompt_ids), params, on_event)
        with self._lock:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) - len(self._free) >= self.max_queue:  # the free slots take some at the next step
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue})")
            request.id = next(self._ids)
            self._waiting.append(request)
            self._lock.notify()
        return request

    def stats(self) -> dict:
        with self._lock:
            used = sum(r.position + 1 for r in self._running)
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.max_batch,
                    "slots_used": self.max_batch - len(self._free), "kv_tokens_used": used,
                    "kv_tokens": self.max_batch * self.slot_len, "steps": self.steps}

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
        while time.monotonic() < deadline and (self._running or self._waiting) and self._thread is not None:
            time.sleep(0.05)
        with self._lock:
            for request in [*self._running, *self._waiting]:
                request.cancel()
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._running or self._waiting:  # no thread, or it did not get to them
            self.step()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._stop):
                    self._lock.wait()
                if self._stop and not (self._waiting or self._running):
                    return
            self.step()

    # -- one step ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, run one batch, sample, hand out events. Returns whether any request is left."""
        with self._lock:
            for request in [r for r in self._running if r.cancelled]:
                self._finish(request, "cancelled")
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                request.finish_reason = "cancelled"
                _emit(request, FinishEvent("cancelled"))
            while self._free and self._waiting:
                request = self._waiting.popleft()
                request.slot = self._free.pop()
                self._running.append(request)
            batch = list(self._running)
        if not batch:
            return False
        ids, slots, positions, logit_rows, sampled = [], [], [], [], []
        for request in batch:  # decode rows: one token each
            if request.prefilled == len(request.prompt_ids):
                ids.append(request.tokens[-1])
                slots.append(request.slot)
                positions.append(request.position)
                logit_rows.append(len(ids) - 1)
                sampled.append(request)
        budget = self.prefill_chunk
        for request in batch:  # then prompt chunks, oldest first, within the budget
            left = len(request.prompt_ids) - request.prefilled
            if left == 0 or budget == 0:
                continue
            take = min(left, budget)
            ids.extend(request.prompt_ids[request.prefilled:request.prefilled + take])
            slots.extend([request.slot] * take)
            positions.extend(range(request.prefilled, request.prefilled + take))
            request.prefilled += take
            budget -= take
            if request.prefilled == len(request.prompt_ids):
                logit_rows.append(len(ids) - 1)
                sampled.append(request)
        try:
            logits = self._run(ids, slots, positions, logit_rows)
        except Exception as err:  # noqa: BLE001  (one failed step ends its requests, never the engine)
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            with self._lock:
                for request in batch:
                    self._finish(request, "error", message)
            return bool(self._waiting)
        self.steps += 1
        for request, row in zip(sampled, logits):
            try:
                self._sample(request, row)
            except Exception as err:  # noqa: BLE001  (a bad row, e.g. NaN logits, ends its request only)
                with self._lock:
                    self._finish(request, "error", f"sampling failed: {err}")
        with self._lock:
            return bool(self._running or self._waiting)

    def _run(self, ids, slots, positions, logit_rows) -> np.ndarray:
        import tvm

        def tensor(values):
            return tvm.runtime.tensor(np.asarray(values, dtype=np.int32), self.gen.device)

        tokens = tvm.runtime.tensor(np.asarray(ids, dtype=np.int32).reshape(1, -1), self.gen.device)
        logits = self.gen.run_step(tokens, tensor(slots), tensor(positions), tensor(logit_rows), self._caches)
        return logits.numpy()[0, :, :self.gen.vocab_size]

    def _sample(self, request: Request, logits: np.ndarray) -> None:
        p = request.params
        token = next_token(logits, request.rng, p.temperature, p.top_k, p.top_p)
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
        reason = None
        if token in self.gen.stop_token_ids:
            reason = "eos"
        elif len(request.tokens) >= p.max_tokens:
            reason = "length"
        elif len(request.prompt_ids) + len(request.tokens) >= self.slot_len:
            reason = "context"
        if reason:
            with self._lock:
                self._finish(request, reason)

    def _finish(self, request: Request, reason: str, message: str = "") -> None:
        """With the lock held: the request leaves, its slot is free for the next."""
        if request in self._running:
            self._running.remove(request)
            self._free.append(request.slot)
        request.finish_reason = reason
        _emit(request, FinishEvent(reason, message))


def _emit(request: Request, event: TokenEvent | FinishEvent) -> None:
    """Hand an event to its request's callback; a callback that fails cancels its own request, never the engine."""
    try:
        request.on_event(event)
    except Exception:  # noqa: BLE001  (the caller's code: whatever it raises stays with its request)
        request.cancel()


def _itemsize(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def generate_batch(gen, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int | None = None, stop=(), max_batch: int = 8,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> list:
    """Generator.generate for many prompts at once, batched on this thread (the habit of vLLM's
    `LLM.generate`): a list of Generations in the order of the prompts, each what `generate` gives that
    prompt alone with the same arguments."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    stop = [s for s in stop if s]
    engine = BatchEngine(gen, max_batch=max_batch, max_queue=len(prompts), prefill_chunk=prefill_chunk)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    results, errors = [], []
    for prompt in prompts:
        ids = gen._check_ids(gen.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        result = Generation(text="", ids=[], prompt_ids=ids)
        handle: list[Request] = []  # the request, once submitted: its events may stop it

        def on_event(event, result=result, handle=handle):
            if isinstance(event, TokenEvent):
                result.ids.append(event.token)
                text = gen.tokenizer.decode(result.ids) if stop and result.finish_reason != "stop" else ""
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    result.text, result.finish_reason = text[:cut], "stop"
                    handle[0].cancel()
            elif result.finish_reason != "stop":
                result.finish_reason = event.reason
                result.text = gen.tokenizer.decode(result.ids)
                errors.extend([event.message] if event.reason == "error" else [])

        handle.append(engine.submit(ids, params, on_event))
        results.append(result)
    engine.run_until_idle()
    if errors:
        raise GptjError(f"generation failed: {errors[0]}")
    return results
