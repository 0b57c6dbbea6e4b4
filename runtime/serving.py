"""What the HTTP server (runtime/server.py) does with the engine: the served model (its engine, limits and
metrics), an HTTP request's choices as engine requests, and their events, bridged from the engine's thread into
asyncio, as text pieces (runtime/text.py, as every client of the engine). runtime/responses.py turns those into
OpenAI's JSON.

Every choice is one engine request. The engine calls `on_event` on its own thread; the event reaches the request's
handler through `loop.call_soon_threadsafe`. A handler that stops listening (its client went away, or a stop
string ended every choice) cancels what is left, which frees the slots at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptj_tvm.core.errors import GptjError

from .artifact import ArtifactMetadata
from .engine import Engine, FinishEvent, QueueFull, SamplingParams, TokenEvent
from .generation import PromptTooLong
from .generator import Generator
from .openai_api import ApiError, chat_template, openai_finish_reason
from .serve_options import ServeOptions
from .text import IncrementalText

log = logging.getLogger("uvicorn.error")  # printed with uvicorn's own lines
MIN_SLOT_POSITIONS = 16
DISCONNECT_POLL_S = 0.5  # how often a request waiting on the engine checks that its client is still there
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def slot_positions(meta: ArtifactMetadata, max_batch: int, kv_cache_gb: float | None) -> int:
    """Positions per sequence: the context, or what `kv_cache_gb` (10^9 bytes) of KV cache holds for max_batch
    sequences."""
    context = meta.config.n_positions
    if kv_cache_gb is None:
        return context
    per_position = meta.kv_bytes_per_position
    positions = min(context, int(kv_cache_gb * 1e9) // (max_batch * per_position))
    if positions < MIN_SLOT_POSITIONS:
        raise GptjError(f"--kv-cache-gb {kv_cache_gb} holds {positions} positions per sequence for --max-batch "
                        f"{max_batch} ({per_position} bytes each); give it at least "
                        f"{MIN_SLOT_POSITIONS * max_batch * per_position / 1e9:.3g}")
    return positions


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r, p = self.registry, "gptj_tvm_"
        self.running = Gauge(p + "requests_running", "Engine requests in a slot", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Engine requests queued for a slot", registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "KV cache positions in use / all", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generated_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between two tokens of a sequence", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.finished = Counter(p + "request_finished", "Choices finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.errors = Counter(p + "request_errors", "Error responses, by HTTP status", ["status"], registry=r)
        # vLLM's names: prompt tokens looked up in the prefix cache, and found there
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self._counted = {"prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def scrape(self, engine: Engine | None) -> bytes:
        if engine is not None:
            stats = engine.stats()
            self.running.set(stats["running"])
            self.waiting.set(stats["waiting"])
            self.kv_usage.set(stats["kv_tokens_used"] / stats["kv_tokens"])
            pairs = (("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits))
            for name, counter in pairs:
                counter.inc(stats[name] - self._counted[name])  # the engine counts; the counters follow
                self._counted[name] = stats[name]
        return generate_latest(self.registry)


@dataclass
class Choice:
    index: int
    prompt: int  # which prompt
    text: IncrementalText
    submitted: float
    last_token: float | None = None
    request: object = None  # the engine's Request
    done: bool = False


@dataclass
class Job:
    """One HTTP request: its choices, each an engine request, and the queue their events arrive on."""

    prompts: list[list[int]]
    choices: list[Choice]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache: each prompt's best among its choices (usage counts a prompt
        once, whatever n)."""
        best = [0] * len(self.prompts)
        for choice in self.choices:
            if choice.request is not None:
                best[choice.prompt] = max(best[choice.prompt], choice.request.cached_tokens)
        return sum(best)

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.request is not None and not choice.done:
                choice.request.cancel()


class ServedModel:
    """The app's state: the model once loaded, its engine, and what serving it needs."""

    def __init__(self, artifact_dir, options: ServeOptions):
        max_batch, max_queue, kv_cache_gb = options.max_batch, options.max_queue, options.kv_cache_gb
        api_key, model_name, max_tokens_limit = options.api_key, options.model_name, options.max_tokens_limit
        max_n, max_body_bytes, drain_seconds = options.max_n, options.max_body_bytes, options.drain_seconds
        self.header_timeout, self.verify = options.header_timeout, options.verify
        self.prefill_chunk, self.prefix_cache = options.prefill_chunk, options.prefix_cache
        self.folder = Path(artifact_dir)
        self.meta = ArtifactMetadata.read(self.folder)  # a bad artifact fails here, before serving
        if "step" not in self.meta.functions:  # Vulkan: one sequence at a time
            max_batch = 1
        self.slot_len = slot_positions(self.meta, max_batch, kv_cache_gb)
        self.max_batch, self.max_queue, self.api_key = max_batch, max_queue, api_key
        self.model = model_name or self.folder.resolve().name
        self.max_tokens_limit = max_tokens_limit or self.slot_len
        self.max_n, self.max_body_bytes, self.drain_seconds = max_n, max_body_bytes, drain_seconds
        self.metrics = Metrics()
        self.gen = self.engine = None
        self.template = "plain"
        self.phase = "loading"  # -> ready -> draining; or failed
        self.load_error: str | None = None

    def load(self) -> None:
        gen = Generator.load(self.folder, verify=self.verify)
        engine = gen.engine(max_batch=self.max_batch, max_queue=self.max_queue, positions=self.slot_len,
                            prefill_chunk=self.prefill_chunk, prefix_cache=self.prefix_cache, reserve_memory=True)
        self.gen, self.template, self.longest_token = gen, chat_template(gen.tokenizer), gen.tokenizer.longest_token
        engine.start()
        self.engine = engine
        log.info("%s loaded: %d slots of %d positions, KV cache %.3g GB, prefix cache %s, chat template %s",
                 self.model, self.max_batch, self.slot_len,
                 self.max_batch * self.slot_len * self.meta.kv_bytes_per_position / 1e9,
                 "on" if engine.scheduler.prefixes is not None else "off", self.template)

    def check_ready(self) -> None:
        if self.phase != "ready":
            message = {"loading": "the model is loading", "draining": "the server is shutting down"}.get(
                self.phase, f"the model failed to load: {self.load_error}")
            raise ApiError(503, message, code=self.phase)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise ApiError(404, f"The model '{model}' does not exist; this server has '{self.model}'", "model",
                           "model_not_found")

    async def encode(self, texts: list[str], param: str) -> list[list[int]]:
        """Texts as token ids, off the event loop; a text that cannot fit a sequence's positions, whatever its
        tokens, is refused before it is tokenized."""
        for text in texts:
            if len(text) > self.slot_len * self.longest_token:
                raise ApiError(400, f"{param}: {len(text)} characters cannot fit {self.slot_len} positions (a token "
                                    f"is at most {self.longest_token} characters)", param, "context_length_exceeded")
        return await asyncio.to_thread(self.gen.tokenizer.encode_batch, texts)

    def check_prompt(self, ids: list[int], param: str) -> None:
        """The engine's own check, made for every prompt before any is submitted: a bad one is a 400."""
        try:
            self.engine.check_prompt(ids)
        except PromptTooLong as err:
            raise ApiError(400, f"{param}: {err}", param, "context_length_exceeded") from None
        except GptjError as err:
            raise ApiError(400, f"{param}: {err}", param) from None

    def sampling(self, body, max_tokens: int | None, logprobs: int | None) -> list[SamplingParams]:
        """Each of the n choices' parameters: with a seed, choice i samples with seed + i."""
        if body.n > self.max_n:
            raise ApiError(400, f"n: {body.n} is past this server's limit of {self.max_n}", "n")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} is past this server's limit of {self.max_tokens_limit}",
                           "max_tokens")
        max_tokens = max_tokens or self.max_tokens_limit
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens: {body.min_tokens} is past max_tokens ({max_tokens})", "min_tokens")
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        return [SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                               top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p,
                               seed=None if body.seed is None else body.seed + i, logprobs=logprobs,
                               min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
                for i in range(body.n)]

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]) -> Job:
        """All choices to the engine, or none (a full queue or an error cancels those already in)."""
        loop = asyncio.get_running_loop()
        job = Job(prompts, [])
        metrics = self.metrics
        for p, ids in enumerate(prompts):
            for sampling in params:
                text = IncrementalText(self.gen.tokenizer, stops, min_tokens=sampling.min_tokens)
                choice = Choice(len(job.choices), p, text, time.perf_counter())
                job.choices.append(choice)

                def on_event(event, choice=choice):  # on the engine's thread: never raises into it
                    now = time.perf_counter()
                    if isinstance(event, TokenEvent):
                        metrics.generated_tokens.inc()
                        if choice.last_token is None:
                            metrics.ttft.observe(now - choice.submitted)
                        else:
                            metrics.itl.observe(now - choice.last_token)
                        choice.last_token = now
                    try:
                        loop.call_soon_threadsafe(job.queue.put_nowait, (choice, event))
                    except RuntimeError:  # the loop has closed: nobody is waiting any more
                        pass

                try:
                    choice.request = self.engine.submit(ids, sampling, on_event)
                except QueueFull as err:
                    job.cancel()
                    if self.phase != "ready":
                        raise ApiError(503, str(err), code="draining") from None
                    raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from None
                except GptjError as err:
                    job.cancel()
                    raise ApiError(400, str(err), "prompt") from None
                metrics.prompt_tokens.inc(len(ids))
        return job

    async def pieces(self, job: Job, http):
        """(choice, new text, logprob token indexes, finish reason or None) as the engine produces them; cancels
        what is left when the client goes away (`http.is_disconnected()`, or this generator closed or cancelled)."""
        open_choices = len(job.choices)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while open_choices:
                try:
                    choice, event = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    choice = event = None
                if time.monotonic() >= next_check:  # by the clock: tokens may arrive faster than the poll
                    if await http.is_disconnected():
                        return
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                if choice is None:
                    continue
                if choice.done:  # after its stop string: the tokens and the cancel still on their way
                    continue
                if isinstance(event, FinishEvent) and event.reason == "error":
                    choice.done = True
                    self.metrics.finished.labels("error").inc()
                    raise ApiError(500, f"the engine failed: {event.message}")
                if isinstance(event, FinishEvent) and event.reason == "cancelled":
                    raise ApiError(503, "the server shut down before this request finished", code="draining")
                piece = choice.text.take(event, choice.request)
                finish_reason = openai_finish_reason(choice.text.finish_reason)
                if finish_reason:
                    choice.done = True
                    open_choices -= 1
                    self.metrics.finished.labels(finish_reason).inc()
                yield choice, piece, choice.text.take_logprob_tokens(), finish_reason
        finally:
            for choice in job.choices:
                if not choice.done:
                    self.metrics.finished.labels("abort").inc()
            job.cancel()
