"""One HTTP request through an ASGI app in this process, without a socket: how an engine replica runs the
ForwardedRequest the ingress hands it through the same FastAPI app `gptj-tvm serve` runs (runtime/server.py).

The response comes out as it is sent: first (status, headers), then each body message as (bytes, more_body), so
a stream keeps its chunks. The body is received once; after it, `receive` answers http.disconnect only when the
caller stops reading (this generator closed or cancelled), which is how the app notices a client gone away and
cancels its engine requests.
"""

from __future__ import annotations

import asyncio
import logging

from .replica_routing import ForwardedRequest

log = logging.getLogger("uvicorn.error")  # where uvicorn would log the same failure

_END = object()
_HANDLERS: set = set()  # handlers finishing after their response ended, held until done


async def call_asgi(app, request: ForwardedRequest, client: tuple[str, int] = ("ingress", 0)):
    """Yields (status, headers) once, then (body bytes, more_body) until more_body is False."""
    sent = asyncio.Queue()
    gone = asyncio.Event()
    body_taken = False

    async def receive() -> dict:
        nonlocal body_taken
        if not body_taken:
            body_taken = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
             "client": client, "server": None, "state": {}}

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # the app has answered 500, or it is answered below: logged as uvicorn logs it
            log.exception("Exception in ASGI application")
        finally:
            await sent.put(_END)

    task = asyncio.create_task(run())
    _HANDLERS.add(task)
    task.add_done_callback(_HANDLERS.discard)
    started = finished = False
    try:
        while True:
            message = await sent.get()
            if message is _END:
                if not started:  # the app raised before it answered (its error handlers answer first)
                    yield 500, [(b"content-type", b"application/json")]
                    yield b'{"error": {"message": "internal server error", "type": "server_error"}}', False
                return
            if message["type"] == "http.response.start":
                started = True
                yield message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                more = message.get("more_body", False)
                finished = not more
                yield message.get("body", b""), more
                if finished:
                    return
    finally:
        gone.set()
        if not finished and not task.done():  # the caller went away: stop the handler and its engine requests
            task.cancel()
