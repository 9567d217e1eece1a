"""Pure-ASGI middleware: a request id bound into the log context and echoed back."""

from __future__ import annotations

import random

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestContext:
    """Binds ``request_id`` (from ``X-Request-ID`` or new) into structlog's contextvars.

    A new id is 64 bits of the process's own generator (``random``, reseeded in a forked
    child), not of the OS's: an id names a request in logs and is no secret, and ``os.urandom``
    is a system call that lets go of the GIL, so under load the event loop waited for another
    thread to hand it back on every request (3 of them per task, bench/RESULTS.md)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
                break
        request_id = request_id or f"{random.getrandbits(64):016x}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
