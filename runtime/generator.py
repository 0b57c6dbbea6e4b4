"""`gptj_tvm.load`'s object: a loaded model (runtime/model.py) and the Python API's ways of generating, each a
client of the one engine (runtime/engine.py) with the one text path (runtime/text.py).

`generate` and `stream` run one sequence through an engine of one (prefill and decode over a cache sized to the
sequence); `generate_batch` runs many through the batched step; the server (runtime/serving.py) does the same on
a thread of its own.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

from gptj_tvm.core.errors import GptjError

from .engine import Engine, FinishEvent
from .executors import SequenceExecutor, executor_for
from .generation import Generation, TextStream, check_sampling, finish_stats
from .model import Model
from .scheduler import SamplingParams
from .serve_options import DEFAULT_PREFILL_CHUNK
from .text import IncrementalText


class Generator(Model):
    def engine(self, max_batch: int = 8, max_queue: int = 64, positions: int | None = None,
               prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, prefix_cache: bool = True,
               reserve_memory: bool = False) -> Engine:
        """An engine over this model: the batched step with max_batch slots of `positions` (default the context)
        where the artifact has it, reusing the prompt rows its slots still hold (prefix_cache), else one sequence
        at a time. reserve_memory: the slot caches take their memory now rather than as rows are written (what a
        long-lived server wants; a short batch does not)."""
        return Engine(self, executor_for(self, max_batch, positions, reserve_memory), max_queue=max_queue,
                      prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)

    def _prompt_ids(self, prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _events(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = None, stop: Sequence[str] = (), min_new_tokens: int = 0,
                ignore_eos: bool = False) -> Iterator[tuple[str, Generation]]:
        """Yields (new text piece, the generation so far); the last Generation is complete. min_new_tokens and
        ignore_eos are vLLM's min_tokens and ignore_eos: no stop token or stop string before min_new_tokens, and
        no end at a stop token."""
        params = sampling_params(max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens, ignore_eos)
        engine = Engine(self, SequenceExecutor(self), max_queue=1, prefill_chunk=None)
        events: deque = deque()
        request = engine.submit(self._prompt_ids(prompt), params, events.append)
        result = Generation(text="", ids=[], prompt_ids=request.prompt_ids)
        text = IncrementalText(self.tokenizer, stop, min_tokens=min_new_tokens)
        more = True
        while more:
            more = engine.step()
            while events:
                event = events.popleft()
                if isinstance(event, FinishEvent) and event.reason == "error" and text.finish_reason is None:
                    raise GptjError(f"generation failed: {event.message}")
                piece = text.take(event, request)
                result.ids, result.text, result.finish_reason = text.ids, text.text, text.finish_reason or "length"
                if piece:
                    yield piece, result
        result.stats.update(request.stats, prompt_tokens=len(request.prompt_ids),
                            cached_prompt_tokens=request.cached_tokens)
        finish_stats(result.stats)
        yield "", result

    def stream(self, prompt, **kwargs) -> TextStream:
        """Text pieces as they are decoded (text that could begin a stop string is held back); once the
        stream is exhausted, its `.result` is the complete Generation."""
        return TextStream(self._events(prompt, **kwargs))

    def generate(self, prompt, **kwargs) -> Generation:
        result = None
        for _, result in self._events(prompt, **kwargs):
            pass
        return result

    def generate_batch(self, prompts: Sequence, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), max_batch: int = 8,
                       prefill_chunk: int = DEFAULT_PREFILL_CHUNK, min_new_tokens: int = 0, ignore_eos: bool = False,
                       prefix_cache: bool = True) -> list[Generation]:
        """`generate` for many prompts at once, batched on this thread (the habit of vLLM's `LLM.generate`): one
        Generation per prompt, in order, each what `generate` gives that prompt alone with the same arguments;
        `max_batch` sequences run together. With prefix_cache, a prompt that begins with tokens an earlier one
        computed (a shared system prompt) starts from their rows: stats["cached_prompt_tokens"] says how many."""
        params = sampling_params(max_new_tokens, temperature, top_k, top_p, seed, min_new_tokens, ignore_eos)
        engine = self.engine(max_batch=max_batch, max_queue=len(prompts), prefill_chunk=prefill_chunk,
                             prefix_cache=prefix_cache)
        ids = [engine.check_prompt(self._prompt_ids(p)) for p in prompts]  # all refused before any runs
        texts, requests, errors = [], [], []
        for prompt_ids in ids:
            text = IncrementalText(self.tokenizer, stop, min_tokens=min_new_tokens)
            handle: list = []  # the request, once submitted: a stop string cancels it

            def on_event(event, text=text, handle=handle):
                if isinstance(event, FinishEvent) and event.reason == "error" and text.finish_reason is None:
                    errors.append(event.message)
                text.take(event, handle[0])

            handle.append(engine.submit(prompt_ids, params, on_event))
            texts.append(text)
            requests.append(handle[0])
        engine.run_until_idle()
        if errors:
            raise GptjError(f"generation failed: {errors[0]}")
        return [Generation(text=t.text, ids=t.ids, prompt_ids=p, finish_reason=t.finish_reason,
                           stats={"prompt_tokens": len(p), "cached_prompt_tokens": r.cached_tokens})
                for t, p, r in zip(texts, ids, requests)]


def sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    min_new_tokens: int, ignore_eos: bool) -> SamplingParams:
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise GptjError(f"min_new_tokens must be in 0..max_new_tokens ({max_new_tokens}), got {min_new_tokens}")
    return SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, min_tokens=min_new_tokens,
                          ignore_eos=ignore_eos)
