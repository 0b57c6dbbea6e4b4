"""The ingress of `gptj-tvm serve --replicas`: the one deployment Ray Serve's HTTP proxy sends requests to. It
reads each request's body for its affinity keys (runtime/replica_routing.py), forwards the request whole to an
engine replica through the engine deployment's handle (runtime/replica_router.py picks the replica), and relays
the answer, adding `x-gptj-replica: ID`. It holds no model (no CPUs, no TVM).

Faults. A request whose replica fails before any byte of the answer reached the client (a whole response not yet
computed, a stream before its first chunk) is sent again, to another replica, up to ATTEMPTS times. A stream whose
replica fails after that ends as the single server ends one it cannot finish: each open choice gets a chunk with
finish_reason "error", then an error event, then `data: [DONE]`. Ray Serve restarts the replica.

`/health` and `/metrics` ask every live replica (the router's list) by id: /health is 200 while one is ready,
/metrics is every replica's engine metrics labelled `replica="ID"` and the ingress's own labelled
`replica="ingress"`. `drain(seconds)` is SIGTERM's: new requests get 503, every engine drains as `serve` drains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from . import replica_routing as routing
from .openai_api import ApiError, Shape
from .replica_routing import ForwardedRequest, affinity_keys
from .serve_options import ServeOptions

log = logging.getLogger("ray.serve")
ATTEMPTS = 3  # replicas a request is sent to before it gets a 503
CALL_TIMEOUT_S = 2.0  # one replica's answer to /health or /metrics (a dead one never answers)
FLUSH_SECONDS = 5.0  # after the engines' drain, for the relays to pass on the last events
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)  # its process died, or cannot be reached
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


class StreamTail:
    """What a relayed event stream has said: enough to end it as the engine would (responses.stream)."""

    def __init__(self, path: str, body):
        self.chat = path.rstrip("/") == "/v1/chat/completions"
        self.envelope: dict | None = None
        self.finished: set[int] = set()
        self.seen: set[int] = set()
        self.done = False
        body = body if isinstance(body, dict) else {}
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        self.choices = max(1, n * (1 if self.chat else prompts))

    def saw(self, chunk: bytes) -> None:
        if chunk.startswith(b"data: [DONE]"):
            self.done = True
        # only the first event (its envelope) and those that finish a choice are parsed: the rest is per token
        elif chunk.startswith(b"data: {") and (self.envelope is None or b'"finish_reason": "' in chunk):
            try:
                event = json.loads(chunk[len(b"data: "):])
            except ValueError:
                return
            if self.envelope is None and "id" in event:
                self.envelope = event
            for choice in event.get("choices") or ():
                self.seen.add(choice["index"])
                if choice.get("finish_reason"):
                    self.finished.add(choice["index"])

    def ending(self, message: str) -> list[bytes]:
        if self.done:
            return []
        shape = Shape(self.chat, (self.envelope or {}).get("model", ""))
        shape.id = (self.envelope or {}).get("id", shape.id)
        shape.created = (self.envelope or {}).get("created", shape.created)
        open_choices = sorted((set(range(self.choices)) | self.seen) - self.finished)
        events = [shape.chunk(i, None if self.chat else "", None, "error") for i in open_choices]
        events.append(ApiError(500, message, code="replica_failed").body())
        return [f"data: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def merge_metrics(texts: list[tuple[str, str]]) -> bytes:
    """Prometheus texts of several processes as one, each sample labelled replica="ID"."""
    families: dict = {}
    for replica, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples += samples

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class IngressMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.errors = Counter("gptj_tvm_request_errors", "Error responses, by HTTP status", ["status"], registry=r)
        self.retried = Counter("gptj_tvm_replica_retries", "Requests sent again because their replica failed "
                               "before answering", registry=r)
        self.lost_streams = Counter("gptj_tvm_replica_lost_streams", "Streams ended with an error event because "
                                    "their replica failed", registry=r)

    def text(self) -> str:
        return (generate_latest(self.registry) + generate_latest(routing.ROUTING_METRICS)).decode()


class Ingress:
    def __init__(self, engine, options: ServeOptions):
        self.engine, self.options = engine, options
        self.streaming = engine.options(stream=True)
        self.app_name = serve.get_replica_context().app_name
        self.draining = False
        self.in_flight = 0
        self.metrics = IngressMetrics()
        self.http_app = self._build_app()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.http_app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="gptj-tvm", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request, err: ApiError):
            self.metrics.errors.labels(str(err.status)).inc()
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

        @app.exception_handler(Exception)
        async def internal_error(_request, err: Exception):
            self.metrics.errors.labels("500").inc()
            return JSONResponse(ApiError(500, "internal server error").body(), status_code=500)

        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.scrape, methods=["GET"])
        app.add_api_route("/{path:path}", self.forward,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        return app

    # -- requests ------------------------------------------------------------------------------------------
    async def forward(self, request: Request):
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="draining")
        body = await self._read_body(request)
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):
            data = None  # the engine answers it with the single server's error
        forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                     list(request.scope["headers"]), body, affinity_keys(request.url.path, data))
        self.in_flight += 1
        streaming = False
        try:
            call, (status, headers, replica), (chunk, more) = await self._start(forwarded)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in HOP_HEADERS}
            headers["x-gptj-replica"] = replica
            if not more:
                return Response(chunk, status_code=status, headers=headers)
            streaming = True
            tail = StreamTail(request.url.path, data)
            return StreamingResponse(self._relay(call, chunk, tail, replica), status_code=status, headers=headers)
        finally:
            if not streaming:
                self.in_flight -= 1

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"the body is past this server's limit of {limit} bytes", code="request_too_large")
        return bytes(body)

    async def _start(self, forwarded: ForwardedRequest):
        """The call, its (status, headers, replica) and its first body message; a replica lost before that is
        replaced by another."""
        for attempt in range(ATTEMPTS):
            call = self.streaming.forward.remote(forwarded)
            try:
                return call, await call.__anext__(), await call.__anext__()
            except BackPressureError:
                raise ApiError(429, "every replica's queue is full", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            except REPLICA_LOST as err:
                call.cancel()
                self.metrics.retried.inc()
                log.warning("a replica failed before answering %s %s (%s); sending it again", forwarded.method,
                            forwarded.path, type(err).__name__)
                await asyncio.sleep(0.1 * attempt)
            except asyncio.CancelledError:  # the client went away: so does its engine request
                call.cancel()
                raise
        raise ApiError(503, f"{ATTEMPTS} replicas failed before answering this request", code="replicas_failed")

    async def _relay(self, call, first: bytes, tail: StreamTail, replica: str):
        finished = False
        try:
            tail.saw(first)
            yield first
            async for chunk, more in call:
                tail.saw(chunk)
                yield chunk
            finished = True
        except REPLICA_LOST:
            finished = True
            self.metrics.lost_streams.inc()
            log.warning("replica %s failed during a stream; ending it with an error event", replica)
            for event in tail.ending(f"replica {replica} failed before this stream finished"):
                yield event
        except Exception:  # whatever broke the relay, the client gets an end, not a cut (logged)
            finished = True
            log.exception("relaying a stream from replica %s failed", replica)
            for event in tail.ending("the server failed before this stream finished"):
                yield event
        finally:
            self.in_flight -= 1
            if not finished:  # the client went away: stop the engine's requests
                call.cancel()

    # -- every replica -------------------------------------------------------------------------------------
    async def _replica_ids(self) -> list[str]:
        router = routing.ROUTERS.get(self.app_name)
        if router is None or not router.curr_replicas:  # the handle's router starts with its first call
            await self._call(self.engine.state.remote(ForwardedRequest()), CALL_TIMEOUT_S)
            router = routing.ROUTERS.get(self.app_name)
        return sorted(router.live_ids()) if router is not None else []

    async def known_replicas(self) -> list[str]:
        """The engine replicas this ingress routes to (its handle learns of a new replica a moment after Ray
        Serve starts it)."""
        return await self._replica_ids()

    @staticmethod
    async def _call(response, timeout: float):
        async def answer():
            return await response

        try:
            return await asyncio.wait_for(answer(), timeout)
        except Exception as err:  # noqa: BLE001  (a replica that cannot answer is reported as such)
            response.cancel()
            return err

    async def _each(self, method: str, timeout: float, *args, ids: list[str] | None = None) -> dict:
        """replica id -> its answer to `method` (an exception where it gave none within timeout). One replica
        after another: calls made at once from one request share its request id, and Ray's router can then give
        one call the replica another was routed to."""
        answers = {}
        for replica in await self._replica_ids() if ids is None else ids:
            call = getattr(self.engine, method).remote(ForwardedRequest(pin=replica), *args)
            answers[replica] = await self._call(call, timeout)
        return answers

    async def health(self):
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="draining")
        states = await self._each("state", CALL_TIMEOUT_S, False)
        replicas = {i: ({k: s[k] for k in ("phase", "pid", "node", "threads")} if isinstance(s, dict) else
                        {"phase": "unreachable", "error": type(s).__name__}) for i, s in states.items()}
        if not any(r["phase"] == "ready" for r in replicas.values()):
            raise ApiError(503, "no replica is ready", code="loading")
        return {"status": "ok", "replicas": replicas}

    async def scrape(self):
        states = await self._each("state", CALL_TIMEOUT_S, True)
        texts = [(i, s["metrics"]) for i, s in states.items() if isinstance(s, dict)]
        return Response(merge_metrics(texts + [("ingress", self.metrics.text())]), media_type=CONTENT_TYPE_LATEST)

    async def drain(self, seconds: float) -> dict:
        """New requests get 503; each engine finishes what it holds within `seconds` and ends the rest (their
        drains run at once). Returns each replica's last state."""
        self.draining = True
        log.warning("draining: new requests get 503; running ones have %g s to finish", seconds)
        started = await self._each("drain", CALL_TIMEOUT_S, seconds)
        left = [replica for replica, answer in started.items() if answer is None]
        states = {replica: repr(answer) for replica, answer in started.items() if answer is not None}
        deadline = time.monotonic() + seconds + FLUSH_SECONDS + CALL_TIMEOUT_S
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            for replica, state in (await self._each("state", CALL_TIMEOUT_S, False, ids=left)).items():
                if not isinstance(state, dict) or state["phase"] == "drained":
                    states[replica] = state["phase"] if isinstance(state, dict) else repr(state)
                    left.remove(replica)
        deadline = time.monotonic() + FLUSH_SECONDS
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return states
