"""OpenAI's responses from the served model's text pieces (runtime/serving.py): a whole response, or server-sent
events as the pieces arrive. The routes (runtime/server.py) parse and check a request, then hand it here."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse, StreamingResponse

from .openai_api import ApiError, ChatRequest, Shape, chat_logprobs, completion_logprobs, openai_finish_reason
from .serving import Choice, Job, ServedModel


async def respond(served: ServedModel, http, body, shape: Shape, prompts: list[list[int]], params):
    """Every choice of every prompt to the engine, then the response: JSON, or an event stream with body.stream."""
    job = served.submit(prompts, params, body.stop_strings())
    echo = getattr(body, "echo", False)
    prompt_texts = [served.gen.tokenizer.decode(ids) for ids in prompts] if echo else None
    if body.stream:
        return StreamingResponse(stream(served, http, body, shape, job, prompt_texts), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for _ in served.pieces(job, http):
        pass
    choices = []
    for choice in job.choices:
        kept = list(range(choice.text.kept_tokens()))
        prefix = prompt_texts[choice.prompt] if echo else ""
        entry = shape.choice(choice.index, prefix + choice.text.text,
                             logprobs(served, body, choice, kept, job, prompt_texts),
                             openai_finish_reason(choice.text.finish_reason))
        if body.return_token_ids:
            entry.update(prompt_token_ids=job.prompts[choice.prompt], token_ids=choice.text.ids)
        choices.append(entry)
    return JSONResponse(shape.response(choices, sum(map(len, prompts)), sum(len(c.text.ids) for c in job.choices),
                                       job.cached_tokens()))


def logprobs(served: ServedModel, body, choice: Choice, indexes: list[int], job: Job, prompt_texts,
             with_prompt: bool = True) -> dict | None:
    tokenizer = served.gen.tokenizer
    if isinstance(body, ChatRequest):
        return chat_logprobs(tokenizer, choice.text, indexes) if body.logprobs else None
    if body.logprobs is None:
        return None
    echo = prompt_texts is not None and with_prompt
    prompt_text = prompt_texts[choice.prompt] if prompt_texts is not None else ""
    return completion_logprobs(tokenizer, choice.text, indexes, len(prompt_text),
                               job.prompts[choice.prompt] if echo else None, prompt_text)


async def stream(served: ServedModel, http, body, shape: Shape, job: Job, prompt_texts):
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for choice in job.choices:  # chat: the role first; completions with echo: the prompt first
            if shape.chat:
                yield event(shape.chunk(choice.index, "", None, None, first=True))
            elif prompt_texts is not None:
                yield event(shape.chunk(choice.index, prompt_texts[choice.prompt],
                                        logprobs(served, body, choice, [], job, prompt_texts), None))
        async for choice, piece, indexes, finish_reason in served.pieces(job, http):
            if piece or indexes or finish_reason:
                data = shape.chunk(choice.index, piece if piece or not shape.chat else None,
                                   logprobs(served, body, choice, indexes, job, prompt_texts, with_prompt=False),
                                   finish_reason)
                if body.return_token_ids:
                    data["choices"][0]["token_ids"] = [choice.text.ids[i] for i in indexes]
                yield event(data)
        if body.include_usage:
            yield event(shape.usage_chunk(sum(map(len, job.prompts)), sum(len(c.text.ids) for c in job.choices),
                                          job.cached_tokens()))
        yield "data: [DONE]\n\n"
    except ApiError as err:  # the status line has gone: the error travels as an event, as OpenAI's do
        served.metrics.errors.labels(str(err.status)).inc()
        for choice in job.choices:  # every choice still open ends, then the error, then the end of the stream
            if choice.text.finish_reason is None:
                yield event(shape.chunk(choice.index, None if shape.chat else "", None, "error"))
        yield event(err.body())
        yield "data: [DONE]\n\n"
