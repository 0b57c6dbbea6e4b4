"""`gptj-tvm serve`: an OpenAI-compatible HTTP server (FastAPI, uvicorn) on the engine.

The model loads in the background once the server is up, so `/health` answers 503 until it is ready (and again
while draining). The routes are a module-level router over the served model (a dependency); the engine side is
runtime/serving.py, the responses runtime/responses.py, the request and response shapes runtime/openai_api.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
from contextlib import asynccontextmanager

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptj_tvm.core.errors import GptjError

from .openai_api import (MAX_JSON_DEPTH, ApiError, ChatRequest, CompletionRequest, Shape, chat_prompt, check_json,
                         completion_prompts, from_validation_errors, refuse_unhonoured)
from .responses import respond
from .serve_options import DEFAULTS, ServeOptions
from .serving import ServedModel, log

FLUSH_SECONDS = 5  # after the engine's drain, for the handlers to write the last events


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


async def authorized(request: Request, served: ServedModel = Depends(served_model)) -> None:
    if served.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), served.api_key.encode()):
        raise ApiError(401, "Incorrect API key provided (Authorization: Bearer KEY)", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is past this server's limit of {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is past this server's limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ApiError(400, f"the body is not JSON ({err})") from None
    except RecursionError:
        raise ApiError(400, f"the body nests past {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    check_json(data)
    return data


async def parse(request: Request, served: ServedModel, model):
    served.check_ready()
    data = await read_json(request, served.max_body_bytes)
    try:
        body = model.model_validate(data)
    except ValidationError as err:
        raise from_validation_errors(err.errors()) from None
    refuse_unhonoured(data)
    served.check_model(body.model)
    return body


Served = Depends(served_model)
router = APIRouter()
v1 = APIRouter(dependencies=[Depends(authorized)])


@v1.post("/v1/completions")
async def completions(request: Request, served: ServedModel = Served):
    body = await parse(request, served, CompletionRequest)
    prompts = completion_prompts(body.prompt)
    if isinstance(prompts[0], str):
        prompts = await served.encode(prompts, "prompt")
    for ids in prompts:
        served.check_prompt(ids, "prompt")
    params = served.sampling(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs)
    return await respond(served, request, body, Shape(False, served.model), prompts, params)


@v1.post("/v1/chat/completions")
async def chat_completions(request: Request, served: ServedModel = Served):
    body = await parse(request, served, ChatRequest)
    (ids,) = await served.encode([chat_prompt(body.messages, served.template)], "messages")
    served.check_prompt(ids, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = served.sampling(body, body.max_completion_tokens or body.max_tokens, top)
    return await respond(served, request, body, Shape(True, served.model), [ids], params)


def model_card(served: ServedModel) -> dict:
    return {"id": served.model, "object": "model", "created": int(served.folder.stat().st_mtime),
            "owned_by": "gptj-tvm", "max_model_len": served.slot_len}


@v1.get("/v1/models")
async def models(served: ServedModel = Served):
    return {"object": "list", "data": [model_card(served)]}


@v1.get("/v1/models/{model:path}")
async def model_info(model: str, served: ServedModel = Served):
    served.check_model(model)
    return model_card(served)


@v1.post("/tokenize")
async def tokenize(request: Request, served: ServedModel = Served):
    served.check_ready()
    data = await read_json(request, served.max_body_bytes)
    if not isinstance(data.get("prompt"), str):
        raise ApiError(400, "prompt: must be a string", "prompt")
    (tokens,) = await asyncio.to_thread(served.gen.tokenizer.encode_batch, [data["prompt"]])
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.slot_len}


@v1.post("/detokenize")
async def detokenize(request: Request, served: ServedModel = Served):
    served.check_ready()
    tokens = (await read_json(request, served.max_body_bytes)).get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "tokens: must be a list of token ids", "tokens")
    if any(not 0 <= t < served.gen.vocab_size for t in tokens):
        raise ApiError(400, f"tokens: ids must be in 0..{served.gen.vocab_size - 1}", "tokens")
    return {"prompt": served.gen.tokenizer.decode(tokens)}


@router.get("/health")
async def health(served: ServedModel = Served):
    served.check_ready()
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(served: ServedModel = Served):
    return Response(served.metrics.scrape(served.engine), media_type=CONTENT_TYPE_LATEST)


def add_error_handlers(app: FastAPI, served: ServedModel) -> None:
    """Every error as OpenAI's error object, counted by status; anything unexpected is a 500 (uvicorn logs it)."""

    def refuse(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        served.metrics.errors.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return refuse(err.status, err.body(), err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        return refuse(400, from_validation_errors(err.errors()).body())

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return refuse(err.status_code, ApiError(err.status_code, str(err.detail)).body())

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        # not logged here: Starlette raises it on after this answer, and uvicorn logs it with its traceback
        return refuse(500, ApiError(500, "internal server error").body())


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

    # no /docs, /redoc or /openapi.json: they would be open past --api-key, and the API is OpenAI's, documented there
    app = FastAPI(title="gptj-tvm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.include_router(v1)
    app.include_router(router)

    add_error_handlers(app, served)
    return app


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived within
    header_timeout seconds of its opening or of its last response (uvicorn has no such limit: a client sending
    half a header would hold its connection for ever)."""

    header_timeout = DEFAULTS.header_timeout

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._header_timer.cancel()
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)

    def _headers_overdue(self) -> None:
        # their_state leaves IDLE once h11 has parsed a whole request line and headers
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining as vLLM and OVMS do. On the first SIGINT or SIGTERM it keeps listening, new
    requests and /health get 503, and the engine finishes what it holds within drain_seconds; what is left then
    ends (a stream with finish_reason "error" and [DONE], a whole response with a 503). Only then does uvicorn stop,
    and the process exits 0. A second signal stops at once (uvicorn's own way, exit status of the signal)."""

    def __init__(self, config: uvicorn.Config, served: ServedModel):
        super().__init__(config)
        self.served = served
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.draining = True
        engine = self.served.engine
        self.served.phase = "draining"
        if engine is None:  # still loading, or failed to: nothing to drain
            self.should_exit = True
            return
        log.info("draining: new requests get 503; running ones have %g s to finish", self.served.drain_seconds)
        threading.Thread(target=self._drain, args=(engine,), name="gptj-tvm drain", daemon=True).start()

    def _drain(self, engine) -> None:
        engine.shutdown(self.served.drain_seconds)
        deadline = time.monotonic() + FLUSH_SECONDS  # the handlers write the last events of what the engine ended
        while self.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def server_for(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> _DrainingServer:
    """uvicorn, as `serve` runs it, for an app from create_app."""
    served = app.state.served
    protocol = type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {"header_timeout": served.header_timeout})
    config = uvicorn.Config(app, host=host, port=port, http=protocol, timeout_graceful_shutdown=FLUSH_SECONDS,
                            log_level="info")
    return _DrainingServer(config, served)


def serve(artifact_dir, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain (_DrainingServer). Raises GptjError if the model fails to load."""
    failures = []

    def stop(message: str) -> None:
        failures.append(message)
        runner.should_exit = True

    runner = server_for(create_app(artifact_dir, options, on_load_error=stop), host, port)
    runner.run()
    if failures:
        raise GptjError(f"cannot serve {artifact_dir}: {failures[0]}")
