"""`gptj-tvm serve`: an OpenAI-compatible HTTP server (FastAPI, uvicorn) on the continuous-batching engine.

The model loads in the background once the server is up, so `/health` answers 503 until it is ready (and again
while draining). Routes and errors are here; the engine side is runtime/serving.py, the request and response
shapes runtime/openai_api.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from gptj_tvm.core.errors import GptjError

from .openai_api import (ApiError, ChatRequest, CompletionRequest, Shape, chat_logprobs, chat_prompt,
                         completion_logprobs, completion_prompts, from_validation_errors, refuse_unhonoured)
from .serving import Choice, Job, ServedModel, ServeOptions, log


def create_app(artifact_dir, options: ServeOptions | None = None, *, on_load_error=None, **changes) -> FastAPI:
    """The app; its lifespan loads the artifact in the background and starts the engine, and stops the engine
    (a drain of up to options.drain_seconds) on exit. `changes` override fields of `options` (ServeOptions).
    on_load_error(message) is called if loading fails (the CLI stops the server)."""
    served = ServedModel(artifact_dir, dataclasses.replace(options or ServeOptions(), **changes))

    async def load_in_background():
        try:
            await asyncio.to_thread(served.load)
            served.phase = "ready" if served.phase == "loading" else served.phase
        except Exception as err:  # noqa: BLE001  (any failure to load is reported, in one line)
            served.phase, served.load_error = "failed", str(err).strip().splitlines()[-1] if str(err) else repr(err)
            log.error("cannot serve %s: %s", served.folder, served.load_error)
            if on_load_error is not None:
                on_load_error(served.load_error)

    @asynccontextmanager
    async def lifespan(_app):
        loading = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            served.phase = "draining"
            await loading
            if served.engine is not None:
                await asyncio.to_thread(served.engine.shutdown, served.drain_seconds)

    app = FastAPI(title="gptj-tvm", lifespan=lifespan)
    app.state.served = served

    def refuse(status: int, body: dict) -> JSONResponse:
        served.metrics.errors.labels(str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return refuse(err.status, err.body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        bad = from_validation_errors(err.errors())
        return refuse(400, bad.body())

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return refuse(err.status_code, ApiError(err.status_code, str(err.detail)).body())

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        log.exception("internal error", exc_info=err)
        return refuse(500, ApiError(500, "internal server error").body())

    async def authorized(request: Request) -> None:
        if served.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), served.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided (Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > served.max_body_bytes:
            raise ApiError(413, f"the body is past this server's limit of {served.max_body_bytes} bytes",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > served.max_body_bytes:
                raise ApiError(413, f"the body is past this server's limit of {served.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    async def parse(request: Request, model):
        served.check_ready()
        data = await read_json(request)
        try:
            body = model.model_validate(data)
        except ValidationError as err:
            raise from_validation_errors(err.errors()) from None
        refuse_unhonoured(data)
        served.check_model(body.model)
        return body

    guarded = [Depends(authorized)]

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompts = completion_prompts(body.prompt, served.gen.tokenizer)
        for ids in prompts:
            served.check_prompt(ids, "prompt")
        params = served.sampling(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs)
        return await respond(request, body, Shape(False, served.model), prompts, params)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        ids = served.gen.tokenizer.encode(chat_prompt(body.messages, served.template))
        served.check_prompt(ids, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = served.sampling(body, body.max_completion_tokens or body.max_tokens, top)
        return await respond(request, body, Shape(True, served.model), [ids], params)

    async def respond(request: Request, body, shape: Shape, prompts, params):
        job = served.submit(prompts, params, body.stop_strings())
        echo = getattr(body, "echo", False)
        prompt_texts = [served.gen.tokenizer.decode(ids) for ids in prompts] if echo else None
        if body.stream:
            return StreamingResponse(stream(request, body, shape, job, prompt_texts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in served.pieces(job, request):
            pass
        choices = []
        for choice in job.choices:
            kept = list(range(choice.text.kept_tokens()))
            prefix = prompt_texts[choice.prompt] if echo else ""
            entry = shape.choice(choice.index, prefix + choice.text.text,
                                 logprobs(body, choice, kept, job, prompt_texts), choice.text.finish_reason)
            if body.return_token_ids:
                entry.update(prompt_token_ids=job.prompts[choice.prompt], token_ids=choice.text.ids)
            choices.append(entry)
        return JSONResponse(shape.response(choices, sum(map(len, prompts)),
                                           sum(len(c.text.ids) for c in job.choices)))

    def logprobs(body, choice: Choice, indexes: list[int], job: Job, prompt_texts, with_prompt: bool = True):
        if isinstance(body, ChatRequest):
            return chat_logprobs(served.gen.tokenizer, choice.text, indexes) if body.logprobs else None
        if body.logprobs is None:
            return None
        echo = prompt_texts is not None and with_prompt
        prompt_text = prompt_texts[choice.prompt] if prompt_texts is not None else ""
        return completion_logprobs(served.gen.tokenizer, choice.text, indexes, len(prompt_text),
                                   job.prompts[choice.prompt] if echo else None, prompt_text)

    async def stream(request: Request, body, shape: Shape, job: Job, prompt_texts):
        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            for choice in job.choices:  # chat: the role first; completions with echo: the prompt first
                if shape.chat:
                    yield event(shape.chunk(choice.index, "", None, None, first=True))
                elif prompt_texts is not None:
                    yield event(shape.chunk(choice.index, prompt_texts[choice.prompt],
                                            logprobs(body, choice, [], job, prompt_texts), None))
            async for choice, piece, indexes, finish_reason in served.pieces(job, request):
                if piece or indexes or finish_reason:
                    data = shape.chunk(choice.index, piece if piece or not shape.chat else None,
                                       logprobs(body, choice, indexes, job, prompt_texts, with_prompt=False),
                                       finish_reason)
                    if body.return_token_ids:
                        data["choices"][0]["token_ids"] = [choice.text.ids[i] for i in indexes]
                    yield event(data)
            if body.include_usage:
                yield event(shape.usage_chunk(sum(map(len, job.prompts)), sum(len(c.text.ids) for c in job.choices)))
            yield "data: [DONE]\n\n"
        except ApiError as err:  # the status line has gone: the error travels as an event, as OpenAI's do
            served.metrics.errors.labels(str(err.status)).inc()
            yield event(err.body())

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model_info(model: str):
        served.check_model(model)
        return model_card()

    def model_card() -> dict:
        return {"id": served.model, "object": "model", "created": int(served.folder.stat().st_mtime),
                "owned_by": "gptj-tvm", "max_model_len": served.slot_len}

    @app.get("/health")
    async def health():
        served.check_ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.scrape(served.engine), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request):
        served.check_ready()
        data = await read_json(request)
        if not isinstance(data.get("prompt"), str):
            raise ApiError(400, "prompt: must be a string", "prompt")
        tokens = served.gen.tokenizer.encode(data["prompt"])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.slot_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: Request):
        served.check_ready()
        tokens = (await read_json(request)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens: must be a list of token ids", "tokens")
        if any(not 0 <= t < served.gen.vocab_size for t in tokens):
            raise ApiError(400, f"tokens: ids must be in 0..{served.gen.vocab_size - 1}", "tokens")
        return {"prompt": served.gen.tokenizer.decode(tokens)}

    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with /health turning 503 as soon as a signal asks it to stop."""

    def __init__(self, config: uvicorn.Config, served: ServedModel):
        super().__init__(config)
        self.served = served

    def handle_exit(self, sig, frame) -> None:
        if self.served.phase in ("loading", "ready"):
            self.served.phase = "draining"
        super().handle_exit(sig, frame)


def serve(artifact_dir, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None) -> None:
    """Serve until SIGINT or SIGTERM: then no new requests, those running get drain_seconds to finish (uvicorn's
    graceful shutdown, then the engine's drain), the rest are cancelled. Raises GptjError if the model fails to
    load."""
    failures = []
    app = create_app(artifact_dir, options, on_load_error=lambda message: (failures.append(message), stop()))
    served = app.state.served
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=math.ceil(served.drain_seconds),
                            log_level="info")
    runner = _DrainingServer(config, served)

    def stop() -> None:
        runner.should_exit = True

    runner.run()
    if failures:
        raise GptjError(f"cannot serve {artifact_dir}: {failures[0]}")
